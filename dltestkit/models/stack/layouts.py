"""test_memory_layouts: non-contiguous inputs, and channels_last inputs with the model in
channels_last, give the outputs and gradients of contiguous ones."""

from __future__ import annotations

import unittest
from typing import Any, Dict, List, NoReturn, Optional, Tuple

import torch
from torch import nn

from ...core.contract import check
from ...core.messages import exception_text, listed
from ...core.options import option
from ...core.paths import map_tensors, named_tensors
from ...core.validators import is_bool
from ...core.watch import ModuleTracker, Watch, raising_user_line, tensors_in, watching
from .contract import (
    Run,
    StackContract,
    differences,
    gradient_differences,
    recording_module_outputs,
)

__all__ = ["MemoryLayouts"]


def padded_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values in a view of a larger tensor, one more element along every
    dimension: non-contiguous, and no two of its dimensions can be merged by ``.view()`` (as a
    crop or a slice of a larger batch is)."""
    if tensor.dim() == 0:
        return tensor
    larger = tensor.new_zeros([size + 1 for size in tensor.shape])
    view = larger[tuple(slice(0, size) for size in tensor.shape)]
    view.copy_(tensor)
    return view


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


class _FailureWatch(Watch):
    """Note the torch call that raised, and the memory of the tensors it was given."""

    def __init__(self, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.storages: List[int] = []

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            return func(*args, **kwargs)
        except BaseException as exc:
            noted = self._failure
            self.note_failure(func, exc, tensors_in(args) + tensors_in(kwargs))
            if self._failure is not noted:  # the innermost call that raised
                self.storages = [_storage(t) for t in tensors_in(args)[:1]]
            raise


def _storage(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())


class MemoryLayouts(StackContract):
    """The model gives the same results for inputs in any memory layout."""

    strict_layouts: bool = option(False, is_bool, example="True")
    """Whether the model must take its inputs in any memory layout.

    `False`: a model that raises on a non-contiguous or channels_last input itself (`x.view(...)`
    of an input: it needs its inputs contiguous, as a DataLoader makes them) makes that part of
    test_memory_layouts skip, naming the line; one that raises on a tensor it computed, or gives
    other values, fails either way."""

    @check(
        reads=(
            "model",
            "inputs",
            "loss_fn",
            "stack_tolerance",
            "strict_layouts",
        )
    )
    def test_memory_layouts(self) -> None:
        """Check that non-contiguous inputs, and channels_last inputs with the model in
        channels_last, give the outputs and gradients of contiguous inputs.

        Catches code that assumes a memory layout: a .view() after a convolution, which
        raises on channels_last activations (.reshape() works), a flatten by as_strided or
        a kernel that reads memory as if contiguous, which silently gives other values;
        named with their line or the first submodule whose output differs.

        In eval mode, with a gradient for every floating-point input. Non-contiguous: every
        input tensor as a view of a larger one (as a crop is). channels_last: every 4-d
        floating-point input (images) in ``torch.channels_last``, and the model converted
        with ``model.to(memory_format=torch.channels_last)``, the layout in which
        convolutions run fastest.
        """
        # PyTorch's own CPU kernels rather than oneDNN's, for every run: oneDNN's backward
        # pass of a strided 1x1 convolution over few channels in channels_last corrupts the
        # process's memory on one thread in torch 2.14 (timm's RepVGG stem: a crash, not a
        # result); the layouts are the model's to get right, whichever kernels run them
        backend: Any = torch.backends.mkldnn  # (its flags() would warn about TF32 on GPUs)
        onednn, backend.enabled = backend.enabled, False
        try:
            self._compare_layouts()
        finally:
            backend.enabled = onednn

    def _compare_layouts(self) -> None:
        contiguous = map_tensors(lambda t: t.contiguous(), self.inputs)
        reference = self._layout_run(self._copy_model(), contiguous)
        tolerance = self._tolerance(self.model)
        with self.subTest(layout="non-contiguous"):
            self._layout_compare(
                "non-contiguous inputs",
                map_tensors(padded_view, contiguous),
                None,
                reference,
                tolerance,
            )
        four_d = [
            path
            for path, t in named_tensors(self.inputs, prefix="self.inputs")
            if t.is_floating_point() and t.dim() == 4
        ]
        if not four_d:
            self._skip_part(
                "channels_last",
                "self.inputs holds no 4-d floating-point tensor (images, as (batch, channels, "
                "height, width)), to which channels_last applies; the non-contiguous inputs "
                "were checked",
            )
            return
        with self.subTest(layout="channels_last"):
            self._layout_compare(
                f"channels_last inputs ({', '.join(four_d)}) and the model in channels_last",
                map_tensors(_channels_last, contiguous),
                torch.channels_last,
                reference,
                tolerance,
            )

    def _layout_run(self, model: nn.Module, inputs: Any) -> Run:
        return self._step_run(model, self._input_leaves_of(inputs), training=False)

    def _layout_compare(
        self,
        what: str,
        inputs: Any,
        memory_format: Optional[torch.memory_format],
        reference: Run,
        tolerance: float,
    ) -> None:
        model = self._layout_model(memory_format)
        try:
            run = self._layout_run(model, inputs)
        except (AssertionError, unittest.SkipTest):
            raise
        except Exception as exc:
            self._layout_raised(what, inputs, memory_format, exc)
        found = differences(run.output, reference.output, tolerance)
        found += gradient_differences(
            run.input_gradients, reference.input_gradients, tolerance, what="the gradient of"
        )
        found += gradient_differences(run.gradients, reference.gradients, tolerance)
        if not found:
            return
        first = self._layout_first_module(inputs, memory_format, tolerance)
        where = (
            f" The first submodule call whose output differs is {first}: the difference is made "
            "in it, or in the code before it that computes its input."
            if first
            else " Every submodule's output agrees: the difference is made in the model's "
            "own forward."
        )
        self.fail(
            f"with {what}, the model gives other results than with contiguous inputs (eval "
            f"mode, same seed): {listed(found)}.{where} Code that reads a tensor's memory as "
            "if it were contiguous (as_strided, data_ptr, .storage(), a C++ or CUDA kernel "
            "that does not call .contiguous()) gives other values for another layout; use "
            "tensor operations that follow strides (.reshape(), .flatten()), or call "
            ".contiguous() first."
        )

    def _layout_model(self, memory_format: Optional[torch.memory_format]) -> nn.Module:
        model = self._copy_model()
        return model if memory_format is None else model.to(memory_format=memory_format)

    def _layout_raised(
        self,
        what: str,
        inputs: Any,
        memory_format: Optional[torch.memory_format],
        exc: Exception,
    ) -> NoReturn:
        """Report an exception of a run in another layout: a failure, or a skipped part
        when the model raised on one of its inputs itself (it needs them contiguous)."""
        model = self._layout_model(memory_format)
        leaves = self._input_leaves_of(inputs)
        inputs_memory = {_storage(t) for _, t in named_tensors(leaves)}

        def received(module: nn.Module, args: Any, kwargs: Any) -> None:
            # the model is called on copies of the inputs (in their layout): their memory too
            inputs_memory.update(_storage(t) for t in tensors_in(args) + tensors_in(kwargs))

        handle = model.register_forward_pre_hook(received, with_kwargs=True)
        with watching(model, _FailureWatch) as watch:
            try:
                self._step_run(model, leaves, training=False)
            except Exception as again:
                failed = watch.failure(again)
            else:
                failed = None
            finally:
                handle.remove()
        line = raising_user_line(exc)
        at = f", at {line}" if line else ""
        operation = f"{failed.operation} in {failed.where}" if failed else "the model"
        of_an_input = failed is not None and any(s in inputs_memory for s in watch.storages)
        advice = (
            ".view() needs a tensor whose memory is laid out as the view says; use .reshape() "
            "or .flatten() (which copy only when needed), or .contiguous() first"
            if "view" in str(exc) or (failed and "view" in failed.operation)
            else "make the code follow the tensor's strides, or call .contiguous() first"
        )
        if of_an_input and not self.strict_layouts:
            self.skipTest(
                f"with {what}, {operation} raises on an input itself{at}: "
                f"{exception_text(exc).rstrip('.')}. The model needs its inputs contiguous, as a "
                "DataLoader makes them, which is a requirement rather than a bug; to take any "
                f"layout: {advice}. The other layouts were checked; set strict_layouts = True "
                "to make this a failure."
            )
        given = (
            "an input"
            if of_an_input
            else "a tensor the model computed (a convolution of channels_last inputs "
            "returns channels_last)"
            if memory_format is not None
            else "a tensor the model computed"
        )
        self.fail(
            f"with {what}, {operation} raises{at}, on {given}: "
            f"{exception_text(exc).rstrip('.')}. With "
            f"contiguous inputs the model runs. {advice[0].upper()}{advice[1:]}."
        )

    def _layout_first_module(
        self, inputs: Any, memory_format: Optional[torch.memory_format], tolerance: float
    ) -> Optional[str]:
        """The first submodule call (in the order calls end) whose outputs differ between
        contiguous inputs and ``inputs``."""
        recorded = []
        for layout_inputs, layout in (
            (map_tensors(lambda t: t.contiguous(), self.inputs), None),
            (inputs, memory_format),
        ):
            model = self._layout_model(layout)
            with recording_module_outputs(model) as record:
                self._layout_run(model, layout_inputs)
            recorded.append(record.by_call())
        reference, other = recorded
        for name, tensors in other.items():
            expected = reference.get(name)
            if expected is not None and differences(tensors, expected, tolerance):
                return name
        return None
