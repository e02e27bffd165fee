"""test_output_shape: the output's shape, at the batch size of the inputs and at others."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from ..core.contract import check
from ..core.messages import sized
from ..core.options import UNSET, ContractError, option
from ..core.validators import is_shape
from .contract import ModelContract

__all__ = ["OutputShape"]


class OutputShape(ModelContract):
    """The output shape at this and other batch sizes."""

    expected_output_shape: Sequence[int] = option(
        UNSET,
        is_shape,
        example="(4, 10)",
        default_text="unset: for a tensor `inputs`, an output of the inputs' shape (an "
        "autoencoder's) passes, another shape skips that part (the other batch size is "
        "still checked); for other `inputs`, `test_output_shape` skips",
    )
    """The shape of the checked output for self.inputs.

    It starts with the batch size of `inputs`."""

    def _validate_combination(self) -> None:
        super()._validate_combination()
        if self._is_set("expected_output_shape"):
            expected = tuple(self.expected_output_shape)
            if not expected or expected[0] != self._batch_size():
                raise self._contract_error(
                    "expected_output_shape",
                    f"is {expected}, which does not start with the "
                    f"batch size of self.inputs ({self._batch_size()})",
                )

    @check(
        reads=(
            "model",
            "inputs",
            "unbatched_inputs",
            "expected_output_shape",
            "output_key",
            "cross_sample_outputs",
        )
    )
    def test_output_shape(self) -> None:
        """Check that the output shape is ``expected_output_shape`` at this and other batch sizes.

        Catches a wrong output shape, a model that only works at one batch size (a
        hard-coded batch size, a squeeze() that drops the batch dimension).

        A model that returns a list with one element per sample (for a list of samples in
        ``inputs``, as torchvision's detection models do) must return one element per sample
        at every batch size; each element's checked tensor is compared with
        ``expected_output_shape`` without its batch dimension, when it is set.
        """
        batch = self._batch_size()
        expected: Optional[Tuple[int, ...]] = None
        declared = self._is_set("expected_output_shape")
        if declared:
            expected = tuple(self.expected_output_shape)
        elif isinstance(self.inputs, torch.Tensor):
            expected = tuple(self.inputs.shape)
        elif not self._has_sample_lists():
            self.skipTest(
                f"self.inputs is a {type(self.inputs).__name__}; set "
                "self.expected_output_shape to enable this check"
            )
        base = self._eval_pass()
        per_sample = self._per_sample(base, batch)
        if per_sample:
            self._assert_one_per_sample(base, batch, expected, resized=False)
        else:
            if expected is None:
                self.skipTest(
                    f"self.inputs is a {type(self.inputs).__name__} and the model returns a "
                    f"{type(base).__name__}, not a list with one element per sample; set "
                    "self.expected_output_shape to enable this check"
                )
            checked = self._output(base)
            if tuple(checked.shape) != expected and not declared:
                expected = self._undeclared_shape(tuple(checked.shape), expected)
            if tuple(checked.shape) != expected:
                self.fail(
                    f"the output has shape {tuple(checked.shape)} for self.inputs (batch size "
                    f"{batch}), expected {expected}. Fix the model or "
                    f"self.expected_output_shape.{self._output_hint(base)}"
                )
        hint = (
            "The model works at the batch size of self.inputs only: look for a hard-coded "
            "batch size or a squeeze() in forward (use x.shape[0], nn.Flatten/nn.Unflatten, "
            "squeeze(dim))."
        )
        # 1: a squeeze() that drops the batch dimension fails there, and so does any batch
        # size hard-coded for self.inputs (broadcast to it or reshaped to it, it gives another
        # shape, or raises); the cheapest pass. 2 where self.inputs holds 1 sample.
        size = 1 if batch > 1 else 2
        with self.subTest(batch_size=size):
            try:
                with torch.no_grad():
                    output = self._forward(self.model, self._resized_inputs(size))
                    if not per_sample:
                        output = self._output(output)
            except ContractError:
                raise
            except Exception as exc:
                self.fail(
                    f"at batch size {size} the model raises {type(exc).__name__}: {exc}. {hint}"
                )
            if per_sample:
                self._assert_one_per_sample(output, size, expected, resized=True)
                return
            assert expected is not None
            wanted = (size, *expected[1:])
            if tuple(output.shape) != wanted:
                self._skip_if_pairwise_shape(tuple(output.shape), expected, size)
                self.fail(
                    f"at batch size {size} the output has shape "
                    f"{tuple(output.shape)}, expected {wanted}. {hint}"
                )

    def _undeclared_shape(
        self, shape: Tuple[int, ...], inputs_shape: Tuple[int, ...]
    ) -> Tuple[int, ...]:
        """Without expected_output_shape, for an output whose shape is not the inputs'
        (which the check expects then, as an autoencoder's): the shape to check the other
        batch size with, the output's own, saying in a skipped part that the shape itself
        was not checked; a skip of the check where the output is not batch first."""
        batch = self._batch_size()
        seen = (
            f"self.expected_output_shape is not set, and the output has shape {shape} for "
            f"self.inputs, not the inputs' shape {inputs_shape}, which the check expects then "
            "(as an autoencoder's output has): a classifier's or any other output's shape is "
            "yours to declare. Set self.expected_output_shape to the shape the model must "
            "return for self.inputs (it starts with the batch size) to check it"
        )
        if not shape or shape[0] != batch:
            self.skipTest(
                f"{seen}; the output's first dimension is not the batch size ({batch}), so "
                "no other batch size was checked either"
            )
        self._skip_part(
            "shape",
            f"{seen}; the other batch size was checked against the output's own shape, "
            "with its batch dimension changed",
        )
        return shape

    def _skip_if_pairwise_shape(
        self, shape: Tuple[int, ...], expected: Tuple[int, ...], size: int
    ) -> None:
        """Skip this batch size when every dimension that is not as expected follows the
        batch size as the first does: an output comparing pairs of samples (a similarity
        matrix of shape (batch, batch), CLIP's logits_per_image), a design."""
        batch = self._batch_size()
        following = [
            dim
            for dim, (got, want) in enumerate(zip(shape, expected))
            if dim > 0 and got != want and want == batch and got == size
        ]
        others = [
            dim
            for dim, (got, want) in enumerate(zip(shape, (size, *expected[1:])))
            if got != want and dim not in following
        ]
        if len(shape) != len(expected) or not following or others:
            return
        key = "" if self.output_key is None else f" (output_key={self.output_key!r})"
        self.skipTest(
            f"the checked output{key}, of shape {expected}, compares pairs of samples: at "
            f"batch size {size} it has shape {shape}, its dimension"
            f"{'s' if len(following) > 1 else ''} {', '.join(map(str, following))} following "
            "the batch size as the first does, as a similarity matrix's do (CLIP's "
            "logits_per_image), which is a design. Set self.output_key to a per-sample "
            "output, or list this one in self.cross_sample_outputs, to check the shape at "
            "other batch sizes."
        )

    def _assert_one_per_sample(
        self, output: Any, size: int, expected: Optional[Tuple[int, ...]], resized: bool
    ) -> None:
        """A per-sample output (a list) for ``size`` samples has one element per sample, each
        of whose checked tensors has shape ``expected[1:]`` if ``expected`` is given."""
        where = f"at batch size {size}" if resized else f"for self.inputs ({size} samples)"
        if not isinstance(output, list) or len(output) != size:
            self.fail(
                f"{where} the model returns {sized(output)} for {size} samples, one element per "
                "sample expected (for a list of samples in self.inputs, a list the model returns "
                "is taken as one element per sample, as it is for self.inputs"
                + (")" if resized else f", {len(output)} elements for {size} samples here)")
                + ". Look for a sample dropped or added in forward: a slice (images[:-1]), a "
                "loop over range(len(images) - 1), a hard-coded number of samples. A model "
                "that returns several batched outputs should return them as a tuple or dict."
            )
        if expected is None:
            return
        for index, tensor in enumerate(self._sample_outputs(output)):
            if tuple(tensor.shape) != expected[1:]:
                self.fail(
                    f"{where} sample {index}'s output has shape {tuple(tensor.shape)}, "
                    f"expected {expected[1:]} (self.expected_output_shape without its batch "
                    "dimension). Fix the model or self.expected_output_shape; leave it unset "
                    "when the shape varies from sample to sample (detections)."
                )
