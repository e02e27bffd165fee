"""ModelTests: checks for torch nn.Modules."""

from __future__ import annotations

import unittest
from typing import Any, Callable, ClassVar, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._base import ContractError, check
from ._devices import (
    DtypeWatch,
    MetaCannotRun,
    ReplayMismatch,
    available_accelerators,
    error_text,
    watch_meta_forward,
    watching_dtypes,
)
from ._model_base import ModelContract, describe_mode
from ._probes import Probe
from ._random import derived_seed
from ._randomness import RandomDraw, watching_randomness
from ._tensors import (
    batch_entries,
    floating_tensors,
    map_tensors,
    named_tensors,
)

__all__ = ["ModelTests"]

#: A checked output: a tensor, batch first, or the checked tensor of each sample's element.
_Checked = Union[torch.Tensor, List[torch.Tensor]]
#: An output compared for one sample: path, for self.inputs, for another batch, is checked.
_Pair = Tuple[str, torch.Tensor, torch.Tensor, bool]
#: A difference: path, (for the other batch, for self.inputs), report, is checked.
_Found = Tuple[str, Tuple[torch.Tensor, torch.Tensor], str, bool]
#: How many optimisation steps test_all_parameters_updated trains a copy for, at most.
PARAMETER_STEPS = 3
_DEVICE_MIXING = (
    "is not on the expected device",
    "to be on the same device",
    "Expected all tensors to be on the same device",
)


class ModelTests(ModelContract):
    """Checks for a model (an ``nn.Module``) on one batch of inputs.

    ``self.inputs`` is passed as the model is called in your code: a tensor as
    ``model(inputs)``, a tuple or list as positional arguments ``model(*inputs)``, a dict as
    keyword arguments ``model(**inputs)`` (what a tokenizer returns). An argument that is a
    list of tensors or of dicts of tensors carries the batch as the list, one item per sample
    (``(images, targets)`` for torchvision's detection models).
    """

    _mixin_name: ClassVar[str] = "ModelTests"

    @check
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
        if self._is_set("expected_output_shape"):
            expected = tuple(self.expected_output_shape)
        elif isinstance(self.inputs, torch.Tensor):
            expected = tuple(self.inputs.shape)
        elif not self._has_sample_lists():
            self.skipTest(
                f"self.inputs is a {type(self.inputs).__name__}; set "
                "self.expected_output_shape to enable this check"
            )
        with torch.no_grad():
            base = self._forward(self.model, self.inputs)
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
        for size in dict.fromkeys((1, batch + 1)):
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
                    continue
                assert expected is not None
                wanted = (size, *expected[1:])
                if tuple(output.shape) != wanted:
                    self._skip_if_pairwise_shape(tuple(output.shape), expected, size)
                    self.fail(
                        f"at batch size {size} the output has shape "
                        f"{tuple(output.shape)}, expected {wanted}. {hint}"
                    )

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
            got = (
                f"a list of {len(output)} elements"
                if isinstance(output, list)
                else f"a {type(output).__name__}"
            )
            self.fail(
                f"{where} the model returns {got} for {size} samples, one element per sample "
                "expected (for a list of samples in self.inputs, a list the model returns is "
                "taken as one element per sample, as it is for self.inputs"
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

    def _check_meta(self, on_cpu: nn.Module, on_meta: nn.Module, training: bool) -> Optional[str]:
        """Run ``on_meta`` (a copy moved to meta) watched, replaying ``on_cpu``'s data reads.

        Fails on a device bug; returns why this mode could not be checked on meta, or None."""
        mode = describe_mode(training)
        inputs = self._on("meta")
        problem_text: Optional[str] = None
        try:
            output, problem = watch_meta_forward(
                lambda: self._forward(on_cpu, self.inputs, training),
                lambda _: self._forward(on_meta, inputs, training),
                on_meta,
            )
        except ReplayMismatch as exc:
            return f"the forward pass takes another path on the meta device than on the CPU ({exc})"
        except MetaCannotRun as exc:
            cause = exc.failed.exception
            text = error_text(cause)
            return (
                f"the model uses an operation the meta device cannot run, "
                f"{exc.failed.describe()} ({type(cause).__name__}: "
                f"{text.splitlines()[0] if text else ''})"
            )
        except Exception as exc:
            text = error_text(exc)
            if isinstance(exc, RuntimeError) and any(s in text for s in _DEVICE_MIXING):
                problem_text = f"its forward combines a tensor left on the CPU ({text})"
            elif isinstance(exc, NotImplementedError) or "meta" in text.lower():
                return (
                    "the model uses an operation the meta device cannot run "
                    f"({type(exc).__name__}: {text.splitlines()[0] if text else ''})"
                )
            else:
                raise
        else:
            if problem is None:
                self._assert_outputs_on(output, "meta", mode)
            else:
                problem_text = problem.describe()
        if problem_text is not None:
            self.fail(
                f"the model does not move to another device as a whole: after .to('meta'), in "
                f"{mode} mode, {problem_text}. Usual causes: a tensor created without device= "
                "in forward (torch.arange(n) -> torch.arange(n, device=x.device), "
                "torch.randn(shape) -> torch.randn_like(x)), a tensor attribute that is not "
                "registered (self.register_buffer), layers kept in a plain Python list "
                "(nn.ModuleList). The same code fails on a GPU."
            )
        return None

    def _assert_outputs_on(self, output: Any, device: str, mode: str) -> None:
        """Every output tensor of the model's copy on ``device`` is on ``device``."""
        stray = [
            f"{path} (on {tensor.device})"
            for path, tensor in named_tensors(output)
            if tensor.device.type != device
        ]
        if stray:
            self.fail(
                f"after .to({device!r}) the model returns {', '.join(stray)} in {mode} "
                "mode; create outputs on the inputs' device (no fixed device, no tensor "
                "made without device= in forward)"
            )

    def _assert_same_outputs(
        self, actual: Any, expected: Any, differs: str, rtol: Optional[float], atol: Optional[float]
    ) -> None:
        """Compare every output tensor of ``actual`` with the tensor at the same path in
        ``expected`` (``differs`` begins the message); outputs that are no tensor (a
        transformers cache object) are not compared."""
        got, wanted = list(named_tensors(actual)), list(named_tensors(expected))
        if [path for path, _ in got] != [path for path, _ in wanted]:
            self.fail(
                f"{differs}: it returns {', '.join(path for path, _ in got) or 'no tensor'} "
                f"instead of {', '.join(path for path, _ in wanted) or 'no tensor'}"
            )
        for (path, a), (_, b) in zip(got, wanted):

            def message(report: str, path: str = path) -> str:
                return f"{differs} ({path}):\n{report}"

            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=message)

    def _check_accelerator(self, device: str) -> None:
        with torch.no_grad():
            reference = self._forward(self.model, self.inputs)
            again = self._forward(self.model, self.inputs, seed=derived_seed(self.seed, 1))
            deterministic = all(
                torch.equal(a, b)
                for (_, a), (_, b) in zip(named_tensors(reference), named_tensors(again))
            )
            moved = self._copy_model(device)
            on_device = self._forward(moved, self._on(device))
            self._assert_outputs_on(on_device, device, "eval")
            on_device = map_tensors(lambda t: t.cpu(), on_device)
            if deterministic:
                self._assert_same_outputs(
                    on_device,
                    reference,
                    f"the model on {device} gives other outputs than on the CPU",
                    rtol=self.device_rtol,
                    atol=self.device_atol,
                )
            else:  # random even in eval mode: GPU noise differs from CPU noise
                for (path, a), (_, b) in zip(named_tensors(on_device), named_tensors(reference)):
                    self.assertEqual(a.shape, b.shape, f"{path} has another shape on {device}")
                    self.assertTrue(torch.isfinite(a).all(), f"{path} is not finite on {device}")
            # Back before any training-mode pass: that one updates BatchNorm's running
            # statistics, which would change the eval outputs of a correct model.
            back = self._forward(moved.to("cpu"), self.inputs)
            self._assert_same_outputs(
                back,
                reference,
                f"the model moved to {device} and back gives other outputs than before",
                rtol=0,
                atol=0,
            )
            in_training = self._copy_model(device)
            self._assert_outputs_on(
                self._forward(in_training, self._on(device), training=True), device, "training"
            )

    @check
    def test_device_moving(self) -> None:
        """Check that the model moves to another device as a whole (on ``meta``, no GPU needed).

        Catches a model that does not move to another device as a whole: tensors created
        without device= (position ids, noise), unregistered tensor attributes, layers in a
        plain list, outputs left on the CPU; found on the meta device, without a GPU.
        """
        on_cpu, on_meta = self._copy_model(), self._copy_model("meta")
        unchecked: Dict[str, str] = {}  # mode: why it could not be checked
        for training in (False, True):  # eval first: only training mode updates BatchNorm
            why = self._check_meta(on_cpu, on_meta, training)
            if why is not None:
                unchecked[describe_mode(training)] = why
        if len(unchecked) == 2:
            reasons = list(dict.fromkeys(unchecked.values()))
            self.skipTest(
                (
                    f"in eval and training mode, {reasons[0]}"
                    if len(reasons) == 1
                    else "; ".join(f"in {mode} mode, {why}" for mode, why in unchecked.items())
                )
                + ", so device bugs could not be checked without a GPU"
            )
        for mode, why in unchecked.items():  # the other mode was checked: report this one
            with self.subTest(mode=mode):
                self.skipTest(
                    f"in {mode} mode, {why}, so device bugs could not be checked in {mode} "
                    "mode without a GPU (the other mode was checked)"
                )

    @check
    def test_device_moving_on_gpu(self) -> None:
        """Check that a copy moved to each GPU (CUDA, MPS, XPU) and back gives the CPU's outputs.

        Catches outputs that change when the model is moved to a real GPU and back (skips
        without one).
        """
        found = self.accelerators if self._is_set("accelerators") else available_accelerators()
        if not found:
            self.skipTest(
                "no CUDA, MPS or other accelerator: outputs on a GPU were not "
                "compared; test_device_moving checked device bugs on the meta device"
            )
        for device in found:
            with self.subTest(device=device):
                self._check_accelerator(device)

    # -- dependence on the inputs -------------------------------------------------------------
    @check
    def test_batch_independence(self) -> None:
        """Check that each sample's output depends on its own input only (eval mode).

        Catches samples mixed across the batch: a reshape used as a transpose, softmax or
        normalisation over dim 0, batch statistics, also when computed without gradient
        (detach, no_grad, .data); for token inputs too, through their embeddings.

        Two comparisons: gradients (no other sample's output may depend on sample ``i``'s
        input, exactly), and values (sample ``i``'s outputs in a batch of copies of sample
        ``i`` must be those in ``inputs``). When no input can be differentiated (token ids
        transformed before their embedding) or the output is not computed from the inputs in
        the autograd graph (a frozen part under torch.no_grad()), only the values are
        compared, and the failure message says so.
        """
        batch = self._batch_size()
        if batch < 2:
            raise self._contract_error(
                "inputs",
                f"holds {batch} sample; test_batch_independence needs at least 2 (4 is plenty)",
            )
        output, probes = self._probe(self.model, required=False)
        per_sample = self._per_sample(output, batch)
        if per_sample:
            rows = self._sample_outputs(output)
            if len(rows) != batch:
                self.fail(
                    f"the model returns a list of {len(rows)} elements for the {batch} samples "
                    "of self.inputs, not one element per sample (a list returned for a list "
                    "of samples is one element per sample); see test_output_shape"
                )
            weights = self._weights(rows)
            checked = torch.stack([(r * w).sum().double() for r, w in zip(rows, weights)])

            def others_output(index: int) -> torch.Tensor:
                return torch.cat([checked[:index], checked[index + 1 :]]).sum()

        else:
            checked = self._output(output)
            if checked.dim() == 0 or checked.shape[0] != batch:
                self.fail(
                    f"the checked output has shape {tuple(checked.shape)}, whose first "
                    f"dimension is not the batch size {batch}.{self._output_hint(output)}"
                )
            weights = self._weights([checked])

            def others_output(index: int) -> torch.Tensor:
                others = [other for other in range(batch) if other != index]
                return (checked[others] * weights[0][others]).sum()

        traced = bool(probes) and self._connected(checked, probes)
        if traced:
            for index in range(batch):
                depends = self._dependence(others_output(index), probes)
                for probe, where in zip(probes, depends):
                    if probe.depends(where, index):
                        if not per_sample:
                            self._skip_if_pairwise(output, checked, weights[0], probes, index)
                        self.fail(
                            f"sample {index}'s {probe.describe()} gets a gradient from the "
                            "outputs of the other samples of the batch (its own output masked "
                            "out): the model mixes samples. Look for a reshape/view used "
                            "instead of a transpose/permute, softmax/normalisation over dim 0, "
                            "statistics over the batch, or BatchNorm with "
                            "track_running_stats=False."
                        )
        self._compare_with_copies(probes, traced)

    def _skip_if_pairwise(
        self,
        output: Any,
        checked: torch.Tensor,
        weights: torch.Tensor,
        probes: List[Probe],
        sample: int,
    ) -> None:
        """Skip when the checked output compares pairs of samples by design: its second
        dimension is the batch too, and element (r, c) depends on samples r and c only (a
        similarity matrix: CLIP's logits_per_image, scores against in-batch negatives)."""
        batch = self._batch_size()
        if checked.dim() < 2 or checked.shape[1] != batch:
            return
        others = [other for other in range(batch) if other != sample]
        pairs = (checked[others][:, others] * weights[others][:, others]).sum()
        if any(where[sample].any() for where in self._dependence(pairs, probes)):
            return
        key = "" if self.output_key is None else f" (output_key={self.output_key!r})"
        self.skipTest(
            f"the checked output{key}, of shape {tuple(checked.shape)}, compares pairs of "
            f"samples: its element (i, j) depends on samples i and j only, as a similarity "
            "matrix does (CLIP's logits_per_image, scores against in-batch negatives), which "
            "is a design, not a mix-up. List it in self.cross_sample_outputs, or set "
            "self.output_key to a per-sample output (an embedding), so that the samples' "
            f"independence is checked.{self._output_hint(output)}"
        )

    def _compare_with_copies(self, probes: List[Probe], traced: bool) -> None:
        """The value part of test_batch_independence: for each sample ``i``, the outputs at
        ``i`` for a batch of ``batch`` copies of sample ``i`` (same batch size, so the same
        kernels) must be those for self.inputs (within the dtype's default tolerance).
        Compared: the checked output and every other floating-point output whose first
        dimension behaves as the batch (equal rows for a batch of copies); for an output that
        is one element per sample, every tensor of sample ``i``'s element, with its shape.

        Copies of sample ``i`` also change the shapes of the other samples of a list of
        samples of different shapes: when only that explains a difference (the same batch
        with the other samples' values changed and their shapes kept gives sample ``i`` the
        outputs it has for self.inputs), the part for sample ``i`` is skipped, saying so,
        unless independent_of_batch_shapes is set."""
        batch = self._batch_size()
        with torch.no_grad():
            together = self._forward(self.model, self.inputs)
            alone = [self._forward(self.model, self._inputs_of([i] * batch)) for i in range(batch)]
        per_sample = self._per_sample(together, batch)
        for sample, copies in enumerate(alone):
            what = f"a batch of {batch} copies of sample {sample}"
            pairs = self._pairs(together, copies, sample, per_sample, what)
            found = _first_mismatch(pairs, cut=not per_sample)
            if found is None:
                continue
            path, values, mismatch, checked = found
            if self._shapes_explain(together, sample, per_sample, pairs, found):
                continue
            self._fail_batch_dependent(
                together, sample, path, values, mismatch, probes, traced, checked
            )
        if not traced:  # (batch statistics make copies give the same output: checked first)
            outputs: List[_Checked] = [
                self._sample_outputs(copies) if per_sample else self._output(copies)
                for copies in alone
            ]
            self._fail_if_ignored(together, probes, outputs)

    def _pairs(
        self, together: Any, other: Any, sample: int, per_sample: bool, what: str
    ) -> List[_Pair]:
        """The outputs of sample ``sample`` to compare, for self.inputs (``together``) and for
        another batch (``other``, described by ``what``): (path, for self.inputs, for the
        other batch, whether it is the checked output), the checked output first."""
        batch = self._batch_size()
        if per_sample:
            if not isinstance(other, list) or len(other) != batch:
                got = (
                    f"a list of {len(other)} elements"
                    if isinstance(other, list)
                    else f"a {type(other).__name__}"
                )
                self.fail(
                    f"for {what} the model returns {got}, for self.inputs a list of {batch}: "
                    "one element per sample expected (see test_output_shape)"
                )
            prefix = f"output[{sample}]"
            checked = self._sample_outputs([together[sample]])[0]
            passed_over = self.cross_sample_outputs
            named = (
                [(f"{prefix}[{self.output_key!r}]", checked)]
                if self.output_key is not None
                else list(named_tensors(together[sample], prefix, passed_over))
            )
            theirs = (
                {named[0][0]: self._sample_outputs([other[sample]])[0]}
                if self.output_key is not None
                else dict(named_tensors(other[sample], prefix, passed_over))
            )
            if sorted(theirs) != sorted(path for path, _ in named):
                self.fail(
                    f"sample {sample}'s output changes with the other samples of the batch: "
                    f"for {what} it holds {', '.join(theirs) or 'no tensor'}, for self.inputs "
                    f"{', '.join(path for path, _ in named) or 'no tensor'}"
                )
            pairs = [(path, mine, theirs[path], mine is checked) for path, mine in named]
        else:
            checked = self._output(together)
            named = (
                []
                if self.output_key is not None
                else list(named_tensors(together, passed_over=self.cross_sample_outputs))
            )
            if not any(t is checked for _, t in named):
                named.insert(0, ("checked output", checked))
            outputs = dict(named_tensors(other))
            outputs.setdefault("checked output", self._output(other))
            pairs = []
            for path, mine in named:
                found = outputs.get(path)
                if _comparable(mine, found, batch, sample, mine is checked):
                    assert found is not None
                    pairs.append((path, mine[sample], found[sample], mine is checked))
        return sorted(pairs, key=lambda pair: not pair[3])

    def _shapes_explain(
        self, together: Any, sample: int, per_sample: bool, pairs: List[_Pair], found: _Found
    ) -> bool:
        """Whether the difference ``found`` for copies of sample ``sample`` comes from the
        other samples' shapes only; if so, report it as a skipped part of the check."""
        varying = self._varying_shapes()
        if not varying or self.independent_of_batch_shapes:
            return False
        what = "the batch with the other samples' values changed"
        path = found[0]
        try:
            with torch.no_grad():
                changed = self._forward(self.model, self._other_values_changed(sample))
        except Exception as exc:
            self._skip_subtest(
                f"sample {sample}'s {path} changes for a batch of {self._batch_size()} copies "
                f"of sample {sample}, in which the other samples have other shapes than in "
                f"self.inputs ({'; '.join(varying)}). Whether it changes with their shapes (by "
                "design, for a model that pads every sample to the largest of its batch) or "
                "with their values could not be told: the model raises on the other samples' "
                f"values changed (x -> 2x + 1), {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Set "
                "self.independent_of_batch_shapes = True to fail on the difference",
                sample=sample,
            )
            return True
        kept = {path for path, *_ in pairs}
        again = [
            pair
            for pair in self._pairs(together, changed, sample, per_sample, what)
            if pair[0] in kept
        ]
        if _first_mismatch(again, cut=not per_sample) is not None:
            return False
        _, (alone, mine), _, _ = found
        how = (
            f"has shape {tuple(alone.shape)}, for self.inputs {tuple(mine.shape)}"
            if alone.shape != mine.shape
            else "differs from the output for self.inputs"
        )
        self._skip_subtest(
            f"sample {sample}'s {path} changes with the shapes of the other samples of "
            f"the batch, not with their values ({'; '.join(varying)}): for a batch of "
            f"{self._batch_size()} copies of sample {sample} it {how}, but with the other "
            "samples' values changed (x -> 2x + 1) and their shapes kept it is the same. A "
            "model that pads every sample to the largest of its batch does this by design "
            "(torchvision's detection models); set self.independent_of_batch_shapes = "
            "True to fail on it",
            sample=sample,
        )
        return True

    def _skip_subtest(self, reason: str, **params: Any) -> None:
        """Report one part of a check as skipped (a skipped subtest) and go on with the rest."""
        with self.subTest(**params):
            self.skipTest(reason)

    def _fail_if_ignored(
        self,
        together: Any,
        probes: List[Probe],
        alone: Sequence[_Checked],
    ) -> None:
        """When no gradient could be traced: fail (skip without any probe) if every sample
        gets exactly the same checked output although the samples' inputs differ."""
        entries = batch_entries(self.inputs, self.unbatched_inputs)
        inputs_differ = any(
            not _same_sample(value, i, 0) for _, value in entries for i in range(len(value))
        )
        if not inputs_differ or not all(_same_checked(out, alone[0]) for out in alone):
            return
        if probes:
            self.fail(
                f"the checked output does not depend on "
                f"{' or '.join(p.describe() for p in probes)} at all: in eval mode it is not "
                "computed from them in the autograd graph, and every sample gets the same "
                "output although the samples differ (it is built from a constant or from "
                "torch.zeros_like(x), or the inputs are not used)."
                f"{self._output_hint(together)}"
            )
        self.skipTest(
            "every sample gets exactly the same checked output in eval mode although the "
            "samples differ (a zero-initialised output layer, or an output that ignores the "
            "inputs), so comparing outputs shows nothing, and no input can be differentiated: "
            f"{self._unprobed_reason()}"
        )

    def _fail_batch_dependent(
        self,
        together: Any,
        sample: int,
        path: str,
        values: Tuple[torch.Tensor, torch.Tensor],
        mismatch: str,
        probes: List[Probe],
        traced: bool,
        checked: bool,
    ) -> None:
        """Fail: sample ``sample``'s output ``path`` differs (``values``: for copies of the
        sample, for self.inputs), unless the model's outputs change from call to call.
        ``traced``: the gradient comparison of the checked output ran (and passed)."""
        alone, mine = values
        with torch.no_grad():
            again = self._forward(self.model, self.inputs)
        if not all(
            _same(a, b) for (_, a), (_, b) in zip(named_tensors(together), named_tensors(again))
        ):
            self.skipTest(
                "two eval-mode passes over self.inputs give different outputs (state that "
                "changes between calls; see test_eval_deterministic), so outputs for other "
                "batches could not be compared"
                + (" (the gradient comparison passed)" if traced else "")
            )
        batch = self._batch_size()
        if alone.shape == mine.shape:
            one_nan = alone.isnan() ^ mine.isnan()
            difference = (alone.double() - mine.double()).abs()[~(alone.isnan() | mine.isnan())]
            largest = float(difference.max()) if difference.numel() else 0.0
            how = f"it differs from the output for self.inputs by up to {largest:.3g}" + (
                " and is NaN where the other is not" if bool(one_nan.any()) else ""
            )
        else:
            how = f"it has shape {tuple(alone.shape)}, for self.inputs {tuple(mine.shape)}"
        lead = (
            f"sample {sample}'s {path} changes with the other samples of the batch: "
            f"for a batch of {batch} copies of sample {sample} {how}"
        )
        if traced and checked:
            cause = (
                ", although no gradient flows between the samples. The model mixes samples "
                "through values computed without gradient: statistics over the batch taken "
                "under torch.no_grad(), with .detach() or on .data (a hand-written "
                "normalisation), BatchNorm with track_running_stats=False run under "
                "torch.no_grad(), routing with a capacity per batch."
            )
        else:
            cause = (
                ". The model mixes samples: a reshape/view used instead of a "
                "transpose/permute, softmax/normalisation over dim 0, statistics over the "
                "batch (also when computed under torch.no_grad(), with .detach() or on .data), "
                "BatchNorm with track_running_stats=False, routing with a capacity per batch."
            )
            if not traced:
                cause += " (Only outputs were compared: " + (
                    "the checked output is not computed from the inputs in the autograd graph.)"
                    if probes
                    else f"no input can be differentiated: {self._unprobed_reason()}.)"
                )
        self.fail(
            f"{lead}{cause} A mixture of experts that drops tokens over its capacity, or "
            "dynamic quantisation (activation scales taken over the batch), is "
            "batch-dependent by design: skip this check for such a model.\n"
            f"{mismatch}"
        )

    # -- training ----------------------------------------------------------------------------
    @check
    def test_all_parameters_updated(self) -> None:
        """Check that every trainable parameter gets a gradient and changes within a few steps.

        Catches layers that never train: unused, cut off by .detach(), gated off by a factor
        that stays zero, or overwritten by forward; zero-initialised gates (ReZero, LoRA,
        zero-init BatchNorm) are no false alarm.
        """
        model = self._copy_model()
        trainable = self._trainable(model)
        if not trainable:
            self.fail(self._no_trainable_parameter())
        connected = [False] * len(trainable)
        nonzero = [False] * len(trainable)
        problems: Dict[str, str] = {}
        optimizer = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
        steps = 0
        for steps in range(1, PARAMETER_STEPS + 1):
            _, grads = self._gradients(model, trainable, step=steps - 1)
            for position, ((name, parameter), grad) in enumerate(zip(trainable, grads)):
                # a sparse gradient (nn.Embedding(sparse=True)) densified: Adam takes no other
                parameter.grad = grad.to_dense() if grad is not None and grad.is_sparse else grad
                if grad is None:
                    continue
                connected[position] = True
                values = _stored_values(grad)
                if not torch.isfinite(values).all():
                    problems.setdefault(name, "gradient contains NaN or Inf")
                elif values.ne(0).any():
                    nonzero[position] = True
            if problems:  # what trains after a NaN step says nothing
                self.fail(self._untrained_message(problems, len(trainable)))
            stepped_from = [p.detach().clone() for _, p in trainable]
            optimizer.step()  # a zero-initialised gate opens here, so its inputs train next
            if all(nonzero[i] or self._allowed(name) for i, (name, _) in enumerate(trainable)):
                break
        # One more forward pass: an update that forward undoes never trains anything.
        stepped_to = [p.detach().clone() for _, p in trainable]
        with torch.no_grad():
            self._forward(model, self.inputs, training=True, seed=derived_seed(self.seed, steps))
        for position, (name, parameter) in enumerate(trainable):
            if self._allowed(name):
                continue
            if not connected[position]:
                problems[name] = (
                    f"no gradient in {steps} step(s): dead, not connected to the "
                    "loss (unused in forward, cut off by "
                    ".detach()/.data/torch.no_grad(), or in a reentrant checkpoint whose "
                    "input needs no gradient)"
                )
            elif not nonzero[position]:
                problems[name] = (
                    f"gradient exactly zero in each of {steps} steps: gated off "
                    "by something that stays zero (a frozen zero-initialised "
                    "gate or scale, a mask, a ReLU that is dead for the whole "
                    "batch)"
                )
            elif not torch.equal(stepped_to[position], stepped_from[position]) and torch.equal(
                parameter.detach(), stepped_from[position]
            ):
                problems[name] = (
                    "the optimisation step is undone by the next forward pass, "
                    "which overwrites the value (through .data, or in place "
                    "under torch.no_grad())"
                )
        if problems:
            self.fail(self._untrained_message(problems, len(trainable)))

    @staticmethod
    def _untrained_message(problems: Dict[str, str], trainable: int) -> str:
        return (
            f"{len(problems)} of {trainable} trainable parameters would not be trained "
            f"(a copy of the model was trained for up to {PARAMETER_STEPS} Adam steps on "
            "self.inputs):\n  "
            + "\n  ".join(f"{name}: {text}" for name, text in problems.items())
            + "\nParameters behind a zero-initialised gate (ReZero, layer scale, LoRA's B, "
            "a zero-init BatchNorm weight) get their first gradient once the gate has "
            "trained, so they pass. Use every layer in forward and do not detach on the way "
            "to the output; if a parameter may legitimately stay untouched (an expert that "
            "this batch does not route to), list it in self.allowed_unchanged_parameters."
        )

    @check
    def test_finite_outputs_and_gradients(self) -> None:
        """Check that the outputs and every parameter's gradient contain no NaN or Inf.

        Catches NaN or Inf in the outputs or in any gradient (a log or sqrt at or below
        zero, an overflowing exp).
        """
        model = self._copy_model()
        trainable = self._trainable(model)
        output, grads = self._gradients(model, trainable)
        bad_outputs = [
            f"{path} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            for path, t in floating_tensors(output)
            if not torch.isfinite(t).all()
        ]
        if bad_outputs:
            self.fail(
                f"the model's outputs contain NaN or Inf: {', '.join(bad_outputs)}. Look "
                "for log/sqrt/division of values that can be zero or negative, or exp "
                "overflow."
            )
        bad_grads = [
            name
            for (name, _), grad in zip(trainable, grads)
            if grad is not None and not torch.isfinite(_stored_values(grad)).all()
        ]
        if bad_grads:
            self.fail(
                f"the gradients of {', '.join(bad_grads)} contain NaN or Inf although "
                "the outputs are finite. Look for sqrt/log/pow at zero or division by "
                "a small number in forward."
            )

    # -- determinism, persistence, dtypes ------------------------------------------------------
    @check
    def test_eval_deterministic(self) -> None:
        """Check that eval-mode outputs do not change with the random seed, except by sampling.

        Catches randomness left on at evaluation: F.dropout(x, p) without
        training=self.training, a drop-path or a hand-made dropout mask that ignores
        self.training, attention dropout in eval mode, state that changes between calls.

        Two eval-mode passes under different seeds must give identical outputs. When they
        differ, the operations that drew random numbers tell design from bug: a dropout-like
        draw (the dropout functions, a Bernoulli mask, ``torch.rand_like(x) < p``, attention
        dropout) fails; explicit sampling (``torch.randn_like``, ``torch.normal``,
        ``torch.multinomial``, ``torch.distributions``) is a design (a VAE that samples its
        latent code) and skips naming the operation, unless ``deterministic_eval`` is True.
        """
        with torch.no_grad():
            first = self._forward(self.model, self.inputs)
            second = self._forward(self.model, self.inputs, seed=derived_seed(self.seed, 1))
        differing = _first_difference(first, second)
        if differing is None:
            return
        path, largest = differing
        with torch.no_grad():
            again = self._forward(self.model, self.inputs)
        if _first_difference(first, again) is not None:
            self.fail(
                f"two eval-mode passes over self.inputs give different {path}, even "
                "under the same seed: the model is not deterministic (a "
                "non-deterministic kernel, or state that changes between calls)."
            )
        lead = f"{path} changes with the random seed in eval mode (max difference {largest})"
        # Watched only now: a torch function mode makes some modules take another path
        # (nn.TransformerEncoder's fast path), whose outputs differ in the last bits.
        with torch.no_grad(), watching_randomness(self.model) as watch:
            self._forward(self.model, self.inputs)
        dropouts, sampling = watch.dropouts(), watch.sampling()
        if dropouts:
            self.fail(
                f"{lead}: the model draws a dropout mask at evaluation: "
                f"{_draws(dropouts)}. Dropout must be off in eval mode. Usual causes: "
                "F.dropout(x, p) without training=self.training (or use nn.Dropout), a "
                "drop-path or a mask (torch.rand_like(x) < p) applied when not self.training, "
                "F.scaled_dot_product_attention(..., dropout_p=p) when not self.training (pass "
                "dropout_p=p if self.training else 0.0). If the model is meant to drop at "
                "evaluation (Monte Carlo dropout), list test_eval_deterministic in "
                "expected_failed_checks with the reason."
            )
        if sampling and self.deterministic_eval:
            self.fail(
                f"{lead}: the model samples at evaluation ({_draws(sampling)}), and "
                "self.deterministic_eval is True. Return a deterministic value in eval mode "
                "(the mean: mu instead of mu + sigma * eps), or set deterministic_eval = False "
                "if the model samples by design."
            )
        seen = (
            f"the model samples at evaluation: {_draws(sampling)}"
            if sampling
            else "no operation dltestkit can see drew the random numbers (TorchScript code, "
            "a C++ extension)"
        )
        self.skipTest(
            f"{lead}; {seen}. Sampling is a design (a VAE that samples its latent code), "
            "not a bug; set deterministic_eval = True to make this a failure if the model "
            "must be deterministic at evaluation."
        )

    @check
    def test_state_dict_round_trip(self) -> None:
        """Check that ``make_model()`` loaded with the saved ``state_dict`` gives equal outputs.

        Catches state that a saved and reloaded model loses: plain tensor attributes,
        non-persistent buffers that matter, statistics kept in Python attributes.
        """
        make_model: Callable[[], nn.Module] = self._get_or_skip("make_model")
        path = self.make_temp_dir() / "state_dict.pt"
        torch.save(self.model.state_dict(), path)
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:
            self.fail(
                f"torch.load(..., weights_only=True) cannot read the saved state_dict "
                f"({type(exc).__name__}: {exc}). Keep only tensors and plain Python "
                "values in the state dict (get_extra_state)."
            )
        with torch.random.fork_rng(devices=[]):
            # another seed: state missing from the state dict shows up
            torch.manual_seed(derived_seed(self.seed, 1))
            fresh = make_model()
        if not isinstance(fresh, nn.Module):
            raise self._contract_error(
                "make_model", f"returned a {type(fresh).__name__}, not an nn.Module"
            )
        try:
            fresh.load_state_dict(state)
        except RuntimeError as exc:
            self.fail(
                f"the model built by make_model() does not load self.model's state dict: "
                f"{exc}. make_model must build the same architecture as setUp."
            )
        with torch.no_grad():
            expected = self._forward(self.model, self.inputs)
            loaded = self._forward(fresh, self.inputs)
        differing = [
            path
            for (path, a), (_, b) in zip(named_tensors(expected), named_tensors(loaded))
            if a.shape != b.shape or not torch.equal(a.nan_to_num(), b.nan_to_num())
        ]
        if differing:
            suspects = _state_outside_state_dict(self.model, fresh)
            self.fail(
                f"a model built by make_model() and loaded with self.model's state dict gives "
                f"other eval outputs ({', '.join(differing)}): part of the model's state is not "
                "in its state dict, so a saved and reloaded model behaves differently."
                + (
                    f" Tensors outside the state dict that differ: {', '.join(suspects)}."
                    if suspects
                    else ""
                )
                + " Register tensors with self.register_buffer(name, tensor) (persistent), "
                "keep statistics in buffers, not in Python attributes."
            )

    @check
    def test_dtype_moving(self) -> None:
        """Check that a copy moved to each of ``moved_dtypes`` runs and returns that dtype.

        Catches tensors created with a fixed dtype (torch.randn(shape), x.float()) that
        break or upcast a model moved to bfloat16 or float64, named with the line that makes
        them.

        Every floating-point output must have the moved dtype, except a 0-dim one (a loss,
        a metric), which may be float32 instead, and must then be finite: losses are reduced
        in float32 on purpose (``torch.autocast`` does it, and transformers' losses cast the
        logits with ``.float()``, which gives a float32 loss for a float64 model too).
        """
        unrunnable = []  # the dtypes the model could not run in on this platform
        for dtype in self.moved_dtypes:
            with self.subTest(dtype=str(dtype)):
                try:
                    self._check_dtype(dtype)
                except _CannotRun as skip:
                    unrunnable.append(f"{dtype}: {skip}")
                    raise
        if unrunnable and len(unrunnable) == len(self.moved_dtypes):
            self.skipTest(f"no dtype could be checked. {' '.join(unrunnable)}")

    def _check_dtype(self, dtype: torch.dtype) -> None:
        moved = self._copy_model().to(dtype)
        inputs = map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, self.inputs)
        constants: Dict[str, str] = {}  # outputs made beside the computation, by mode
        for training in (False, True):
            mode = describe_mode(training)
            with watching_dtypes(dtype, moved) as watch:
                try:
                    with torch.no_grad():
                        output = self._forward(moved, inputs, training)
                except Exception as exc:
                    self._dtype_error(exc, watch, dtype, training)
            wrong = []
            for path, tensor in floating_tensors(output):
                if tensor.dtype == dtype:
                    continue
                if tensor.dim() == 0 and tensor.dtype == torch.float32:  # a loss, on purpose
                    if not torch.isfinite(tensor):
                        self.fail(
                            f"a copy moved with .to({dtype}) returns {path} = {float(tensor)} "
                            f"in {mode} mode: a scalar (a loss) may be computed in float32, "
                            f"but it must be finite. Look for values that overflow {dtype} "
                            "before the cast to float32 (exp, large logits), or compute them "
                            "in float32 too."
                        )
                    continue
                origin = watch.origin(tensor)
                if origin is not None and origin.deliberate:
                    continue  # an explicit cast (logits.float()): a choice of precision
                if origin is not None and not origin.mixed and not self.strict_output_dtypes:
                    constants.setdefault(path, f"{path} ({tensor.dtype}, made by {origin.text})")
                    continue
                wrong.append(
                    f"{path} ({tensor.dtype}{', made by ' + origin.text if origin else ''})"
                )
            if wrong:
                found = f" First mix of dtypes: {watch.mix()}." if watch.mix() else ""
                self.fail(
                    f"a copy moved with .to({dtype}) returns {', '.join(wrong)} in {mode} "
                    f"mode.{found} {_DTYPE_ADVICE}"
                )
        if constants:
            self.skipTest(
                f"a copy moved with .to({dtype}) returns {', '.join(constants.values())}: "
                "made with a fixed dtype beside the model's computation (no tensor of the "
                f"model's dtype flows into it: a mask of 0s and 1s, a constant), so it "
                "promotes nothing the model computes; everything else has the moved dtype. "
                "Set strict_output_dtypes = True to make such an output a failure (create it "
                "with dtype=x.dtype to pass then)."
            )

    def _dtype_error(
        self, exc: Exception, watch: DtypeWatch, dtype: torch.dtype, training: bool
    ) -> NoReturn:
        """Report an exception of the moved copy for what it is: an operation without a kernel
        for ``dtype`` (skip), a mix of dtypes (fail), or an error of the model's own (fail,
        as it is)."""
        mode = describe_mode(training)
        text = error_text(exc)
        first_line = text.splitlines()[0] if text else ""
        failed = watch.failure(exc)
        try:  # an error that the unmoved model raises too is no dtype problem: report it
            with torch.no_grad():
                self._forward(self._copy_model(), self.inputs, training)
        except Exception:
            raise exc from None
        if isinstance(exc, NotImplementedError) or "not implemented for" in text:
            where = f" ({failed.describe()})" if failed is not None else ""
            raise _CannotRun(
                f"an operation of the model{where} has no {dtype} kernel on the CPU "
                f"({type(exc).__name__}: {first_line}); the other dtypes and checks ran"
            )
        if failed is not None and failed.dtypes and set(failed.dtypes) <= {dtype}:
            raise _CannotRun(
                f"{failed.describe()} cannot run in {dtype} on this platform although every "
                f"floating-point tensor it was given is {dtype} ({type(exc).__name__}: "
                f"{first_line}): an operation without a {dtype} kernel here, not a bug of the "
                "model; the other dtypes and checks ran"
            )
        lead = f"a copy moved with .to({dtype}) raises in {mode} mode: {type(exc).__name__}: "
        first_mix = watch.mix()
        mix = f" First mix of dtypes: {first_mix}." if first_mix else ""
        if failed is None:
            self.fail(
                f"{lead}{text.strip()}, raised by the model's own code, not by a torch "
                f"operation.{mix} A model moved with .to({dtype}) must run in {dtype}; if it "
                "supports only some dtypes, set self.moved_dtypes to those."
            )
        self.fail(
            f"{lead}{text.strip()}, in {failed.describe()}, given "
            f"{' and '.join(map(str, failed.dtypes))} tensors.{mix} {_DTYPE_ADVICE}"
        )


_DTYPE_ADVICE = (
    "A tensor created in forward with a fixed dtype or the default float32 "
    "(torch.randn(shape), torch.tensor([...]), mask.float()) promotes the rest, and a tensor "
    "cast with x.float() that meets the model's weights makes them disagree; create tensors "
    "from the inputs (torch.randn_like(x), x.new_tensor([...]), dtype=x.dtype) and cast back "
    "with .to(x.dtype) before combining. Explicit casts of a result (logits.float()) are fine."
)


class _CannotRun(unittest.SkipTest):
    """A dtype the model cannot run in on this platform (an operation without its kernel)."""


def _stored_values(tensor: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores: of a sparse gradient (nn.Embedding(sparse=True)), its
    non-zero entries, on which elementwise tests such as ``ne`` have no kernel."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


def _draws(draws: List[RandomDraw]) -> str:
    """The first few draws, each once, for a message."""
    unique = list(dict.fromkeys(draw.describe() for draw in draws))
    more = f" and {len(unique) - 3} more" if len(unique) > 3 else ""
    return "; ".join(unique[:3]) + more


def _first_difference(first: Any, second: Any) -> Optional[Tuple[str, str]]:
    """The path of the first output tensor that differs between two runs (NaN equal to NaN),
    with the greatest difference as text; None if every tensor is the same."""
    for (path, a), (_, b) in zip(named_tensors(first), named_tensors(second)):
        if _same(a, b):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return path, "n/a: another shape or dtype"
        if not (a.is_floating_point() or a.is_complex()):
            return path, str(int((a.long() - b.long()).abs().max()))
        both = ~(a.isnan() | b.isnan())
        difference = (a.double() - b.double()).abs()[both]
        return path, f"{float(difference.max()):.3g}" if difference.numel() else "NaN"
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN where the other is NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def _first_mismatch(pairs: List[_Pair], cut: bool) -> Optional[_Found]:
    """The first pair whose outputs differ (beyond the dtype's default tolerance), if any.
    ``cut``: compare over the extent both have in every dimension (an output padded to the
    longest sample of its batch); else a different shape is a difference (another number
    of detections)."""
    for path, mine, theirs, checked in pairs:
        if cut:
            theirs, mine = _common(theirs, mine)
        if theirs.shape != mine.shape:
            mismatch: Optional[str] = (
                f"{path} has shape {tuple(theirs.shape)} for that batch and {tuple(mine.shape)} "
                "for self.inputs (a different number of elements, e.g. of detections, is a "
                "difference)"
            )
        else:
            mismatch = _mismatch(theirs, mine)
        if mismatch is not None:
            return path, (theirs, mine), mismatch, checked
    return None


def _same_sample(value: Any, index: int, other: int) -> bool:
    """Whether samples ``index`` and ``other`` of a batched argument are exactly equal."""
    if isinstance(value, torch.Tensor):
        return _same(value[index], value[other])
    mine, theirs = list(named_tensors(value[index])), list(named_tensors(value[other]))
    return [path for path, _ in mine] == [path for path, _ in theirs] and all(
        _same(a, b) for (_, a), (_, b) in zip(mine, theirs)
    )


def _same_checked(a: _Checked, b: _Checked) -> bool:
    """Exactly equal checked outputs: tensors, or lists of per-sample tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _comparable(
    mine: torch.Tensor, other: Optional[torch.Tensor], batch: int, sample: int, checked: bool
) -> bool:
    """Whether output ``mine`` (for self.inputs) is compared at ``sample`` with ``other`` (for a
    batch of copies of that sample): the checked output always (its first dimension is the
    batch), another output if it is floating-point and its first dimension behaves as the
    batch (the same row for every copy)."""
    if other is None or mine.dim() == 0 or other.dim() != mine.dim():
        return False
    if mine.shape[0] != batch or other.shape[0] != batch:
        return False
    if checked:
        return True
    if not mine.is_floating_point() or other.dtype != mine.dtype:
        return False
    row = other[sample]
    return all(_mismatch(other[i], row) is None for i in range(batch))


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """What torch.testing.assert_close says of ``a`` and ``b`` (the dtype's default
    tolerances, NaN equal to NaN), or None if they are close."""
    try:
        torch.testing.assert_close(a, b, equal_nan=True)
    except AssertionError as error:
        return str(error)
    return None


def _common(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` cut to the extent they share in every dimension (an output padded to
    the longest sequence of its batch is longer for self.inputs than for copies of a short
    sample)."""
    for dim in range(a.dim()):
        size = min(a.shape[dim], b.shape[dim])
        a, b = a.narrow(dim, 0, size), b.narrow(dim, 0, size)
    return a, b


def _state_outside_state_dict(model: nn.Module, other: nn.Module) -> List[str]:
    """Names of tensors of ``model`` not in its state dict that differ in ``other``."""
    in_state = set(model.state_dict())
    found = []
    others = dict(other.named_modules())
    for prefix, module in model.named_modules():
        twin = others.get(prefix)
        if twin is None:
            continue
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                theirs = getattr(twin, name, None)
                if not isinstance(theirs, torch.Tensor) or not torch.equal(value, theirs):
                    found.append(f"{prefix + '.' if prefix else ''}{name} (plain attribute)")
        for name, buffer in module.named_buffers(recurse=False):
            full = f"{prefix + '.' if prefix else ''}{name}"
            theirs = getattr(twin, name, None)
            if full not in in_state and (
                theirs is None or buffer is None or not torch.equal(buffer, theirs)
            ):
                found.append(f"{full} (buffer with persistent=False)")
    return found
