"""The model contract: what the model mixins read, and how their checks call the model.

Every model check goes through the helpers here: ``_forward`` calls the model on (a variant of)
``self.inputs`` in the one way the contract defines, ``_output`` picks the checked output,
``_loss`` makes the default loss from every floating-point output, and ``_probe`` makes the
differentiable views of the inputs that the dependence checks need.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import warnings
from typing import (
    Any,
    Callable,
    ClassVar,
    Collection,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

import torch
from torch import nn

from ._base import (
    REQUIRED,
    Attribute,
    CheckMixin,
    ContractError,
    is_bool,
    is_callable,
    is_instance,
    is_keys,
    is_names,
    is_number,
    is_shape,
    optional,
)
from ._probes import Probe, probe_forward
from ._random import derived_seed
from ._tensors import (
    Key,
    batch_entries,
    batch_length,
    batched_entries,
    call_model,
    describe_batched,
    describe_input,
    floating_tensors,
    input_entries,
    map_tensors,
    named_tensors,
    replace_entries,
    sample_lists,
    select_tensor,
    take_samples,
)

__all__ = ["ModelContract", "describe_mode", "mode"]


def _is_inputs(value: Any) -> Optional[str]:
    if isinstance(value, (torch.Tensor, tuple, list, dict)):
        return None
    return (
        f"is a {type(value).__name__}, not a tensor, a tuple of positional arguments or "
        "a dict of keyword arguments"
    )


def _is_dtypes(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)) and all(
        isinstance(d, torch.dtype) and d.is_floating_point for d in value
    ):
        return None
    return f"is {value!r}, not a list of floating-point torch dtypes"


@contextlib.contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put every submodule in train or eval mode; restore each one's own mode after."""
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes.items():
            module.training = was_training


def _copy_script_module(
    module: torch.jit.ScriptModule, device: Optional[str]
) -> torch.jit.ScriptModule:
    """A copy through ``torch.jit.save`` and ``torch.jit.load`` in memory, loaded onto
    ``device`` if given."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the user chose TorchScript; the checks only copy it
        warnings.filterwarnings("ignore", r"`torch\.jit\.(save|load)` is deprecated", FutureWarning)
        torch.jit.save(module, buffer)
        buffer.seek(0)
        copied: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            buffer, map_location=device
        )
    return copied


def _outermost_script_modules(module: nn.Module) -> Iterator[torch.jit.ScriptModule]:
    for child in module.children():
        if isinstance(child, torch.jit.ScriptModule):
            yield child
        else:
            yield from _outermost_script_modules(child)


def copy_module(model: nn.Module, device: Optional[str] = None) -> nn.Module:
    """A deep copy of ``model``; its TorchScript modules are loaded onto ``device`` if given.

    TorchScript modules (``torch.jit.script``, ``torch.jit.trace``) are copied through
    ``torch.jit.save``/``load``: ``copy.deepcopy`` gives them parameters that are no leaf
    tensors (no optimiser takes them, ``.to()`` refuses them). The parameters of a loaded
    TorchScript module are plain tensors, which ``.to("meta")`` refuses, so they are loaded
    onto the device the copy is meant for; move the copy there afterwards as usual."""
    if isinstance(model, torch.jit.ScriptModule):
        return _copy_script_module(model, device)
    memo: Dict[int, Any] = {
        id(scripted): _copy_script_module(scripted, device)
        for scripted in _outermost_script_modules(model)
    }
    copied: nn.Module = copy.deepcopy(model, memo)
    return copied


def describe_mode(training: bool) -> str:
    return "training" if training else "eval"


@contextlib.contextmanager
def _gradients_set_aside(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Keep the ``.grad`` of ``tensors`` out of the way of a backward pass, and put them back
    after: a backward pass that is not about these tensors leaves no gradient on them."""
    saved = [(tensor, tensor.grad) for tensor in tensors]
    for tensor, _ in saved:
        tensor.grad = None
    try:
        yield
    finally:
        for tensor, grad in saved:
            tensor.grad = grad


class ModelContract(CheckMixin):
    """The contract of the model mixins (ModelTests, SequenceModelTests,
    DistributedModelTests), and how their checks call the model.

    ``self.inputs`` is passed as the model is called in your code: a tensor as
    ``model(inputs)``, a tuple or list as positional arguments ``model(*inputs)``, a dict as
    keyword arguments ``model(**inputs)`` (what a tokenizer returns). An argument that is a
    list of tensors or of dicts of tensors carries the batch as the list, one item per sample
    (``(images, targets)`` for torchvision's detection models).
    """

    _mixin_name: ClassVar[str] = "ModelTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute(
            "model",
            "the model under test, on the CPU",
            "MyModel()",
            default=REQUIRED,
            validate=is_instance(nn.Module, description="a torch.nn.Module"),
        ),
        Attribute(
            "inputs",
            "one batch of inputs, batch dimension first",
            "torch.randn(4, 3, 32, 32)",
            default=REQUIRED,
            validate=_is_inputs,
            details="A tensor is passed as `model(inputs)`, a tuple or list as positional "
            "arguments `model(*inputs)`, a dict as keyword arguments "
            '`model(**inputs)`, e.g. `{"input_ids": ids, "attention_mask": '
            "mask}`. Every tensor with a dimension carries the batch dimension "
            "first, and an argument that is a list of tensors or of dicts of tensors "
            "carries it as the list, one item per sample (images of different sizes, "
            "target dicts: `(images, targets)` for torchvision's detection models), "
            "except those in `unbatched_inputs`. 2 to 8 samples.",
        ),
        Attribute(
            "expected_output_shape",
            "the shape of the checked output for self.inputs",
            "(4, 10)",
            validate=is_shape,
            read_by=("test_output_shape",),
            default_text="the shape of `inputs` when it is a tensor; otherwise unset: "
            "`test_output_shape` skips",
            details="It starts with the batch size of `inputs`.",
        ),
        Attribute(
            "output_key",
            "the index or key of the checked output tensor",
            '"last_hidden_state"',
            default=None,
            validate=optional(is_instance(int, str, description="an int index or a str key")),
            details="`None`: a tensor output itself, else the first element of a tuple, "
            "dict, `ModelOutput` or dataclass (e.g. `logits`). For a list returned with "
            "one element per sample (for a list of samples in `inputs`), the index or key "
            'in each element (`"scores"` of a detection). The checked output '
            "is what the shape, batch-independence and sequence checks look at; "
            "the gradient checks use every floating-point output.",
        ),
        Attribute(
            "cross_sample_outputs",
            "the keys or indices of outputs that compare the samples of the batch with one "
            "another by design",
            '["logits_per_image", "logits_per_text"]',
            default=(),
            validate=is_keys,
            read_by=("test_batch_independence", "test_output_shape"),
            details="A contrastive model's similarity matrix (CLIP's `logits_per_image`), "
            "scores against in-batch negatives: `test_batch_independence` does not compare "
            "them, and the checked output, when `output_key` is `None`, is the first element "
            "not listed. With `output_key` set, only that output is compared.",
        ),
        Attribute(
            "unbatched_inputs",
            "the keys or indices of inputs without a batch dimension",
            '["mask"]',
            default=(),
            validate=is_keys,
            details="They are passed unchanged at every batch size and never "
            "differentiated, e.g. the `(seq, seq)` causal mask of "
            "`nn.TransformerEncoder`.",
        ),
        Attribute(
            "independent_of_batch_shapes",
            "whether each sample's outputs must not change with the shapes of the other "
            "samples either",
            "True",
            default=False,
            validate=is_bool,
            read_by=("test_batch_independence",),
            details="For a list of samples of different shapes in `inputs` (images of "
            "several sizes). `False`: an output that changes with the shapes of the other "
            "samples but not with their values (every sample padded to the largest of the "
            "batch, as torchvision's detection models do) makes that sample's comparison a "
            "skipped part of the check, which names the output; `True`: a failure.",
        ),
        Attribute(
            "loss_fn",
            "a function of the model output giving the scalar loss",
            "lambda out: out.logits.square().mean()",
            default=None,
            validate=optional(is_callable),
            read_by=("test_all_parameters_updated", "test_finite_outputs_and_gradients"),
            details="`None`: every floating-point tensor of the output, weighted with fixed "
            "random weights (so that nothing cancels, as a plain sum of softmax "
            "rows would) and summed.",
        ),
        Attribute(
            "allowed_unchanged_parameters",
            "names or glob patterns of parameters that may legitimately stay untrained",
            '["decoder.unused.*"]',
            default=(),
            validate=is_names,
            read_by=("test_all_parameters_updated",),
        ),
        Attribute(
            "make_model",
            "a zero-argument callable that builds a fresh model of the same architecture",
            "lambda: MyModel()",
            validate=is_callable,
            read_by=("test_state_dict_round_trip",),
        ),
        Attribute(
            "deterministic_eval",
            "whether the model must give the same eval-mode outputs under any seed, "
            "sampling included",
            "True",
            default=False,
            validate=is_bool,
            read_by=("test_eval_deterministic",),
            details="`False`: a model that samples at evaluation (`torch.randn_like`, "
            "`torch.normal`, `torch.multinomial`, `torch.distributions`: a VAE that samples "
            "its latent code) makes `test_eval_deterministic` skip, naming the operation and "
            "its line; dropout left on at evaluation fails either way.",
        ),
        Attribute(
            "moved_dtypes",
            "the floating-point dtypes a copy of the model is moved to",
            "[torch.bfloat16]",
            default=(torch.bfloat16, torch.float64),
            validate=_is_dtypes,
            read_by=("test_dtype_moving",),
        ),
        Attribute(
            "strict_output_dtypes",
            "whether every floating-point output must have the moved dtype, also one the "
            "model makes with a fixed dtype beside its computation",
            "True",
            default=False,
            validate=is_bool,
            read_by=("test_dtype_moving",),
            details="`False`: an output made with a fixed dtype that no tensor of the model's "
            "dtype flows into (a float32 mask of 0s and 1s, as transformers' ViTMAE returns) "
            "makes that dtype's part of `test_dtype_moving` skip, naming it and its line; an "
            "output that such a tensor promoted fails either way.",
        ),
        Attribute(
            "accelerators",
            "the devices whose outputs are compared with the CPU's",
            '["cuda"]',
            validate=is_names,
            read_by=("test_device_moving_on_gpu",),
            default_text="the accelerator torch finds (CUDA, MPS, XPU, ...), if any",
        ),
        Attribute(
            "device_rtol",
            "the relative tolerance comparing GPU and CPU outputs",
            "1e-4",
            default=None,
            validate=optional(is_number),
            read_by=("test_device_moving_on_gpu",),
            details="`None`: the default of `torch.testing.assert_close` for the dtype.",
        ),
        Attribute(
            "device_atol",
            "the absolute tolerance comparing GPU and CPU outputs",
            "1e-5",
            default=None,
            validate=optional(is_number),
            read_by=("test_device_moving_on_gpu",),
        ),
    )

    model: nn.Module
    inputs: Any
    expected_output_shape: Sequence[int]
    output_key: Key
    cross_sample_outputs: Collection[Key]
    unbatched_inputs: Collection[Key]
    independent_of_batch_shapes: bool
    loss_fn: Optional[Callable[[Any], torch.Tensor]]
    allowed_unchanged_parameters: Collection[str]
    make_model: Callable[[], nn.Module]
    deterministic_eval: bool
    moved_dtypes: Sequence[torch.dtype]
    strict_output_dtypes: bool
    accelerators: Sequence[str]
    device_rtol: Optional[float]
    device_atol: Optional[float]

    # -- the contract across attributes --------------------------------------------------
    def _validate_combination(self) -> None:
        super()._validate_combination()
        keys = [key for key, _ in input_entries(self.inputs)]
        unknown = [key for key in self.unbatched_inputs if key not in keys]
        if unknown:
            raise self._contract_error(
                "unbatched_inputs",
                f"names {unknown}, which self.inputs does not have (it has {keys})",
            )
        entries = batch_entries(self.inputs, self.unbatched_inputs)
        if not entries:
            raise self._contract_error(
                "inputs",
                "holds no tensor with a batch dimension and no list of samples (a list of "
                "tensors or of dicts of tensors)",
            )
        sizes = ", ".join(describe_batched(key, value) for key, value in entries)
        if len({batch_length(value) for _, value in entries}) > 1:
            lists = bool(sample_lists(self.inputs, self.unbatched_inputs))
            raise self._contract_error(
                "inputs",
                (
                    f"holds arguments whose numbers of samples differ: {sizes}. A tensor "
                    "carries the batch as its first dimension, a list of tensors or dicts "
                    "as its length, and all must agree; list the arguments that are not "
                    "batched (a (seq, seq) mask, a list that is not one item per sample) "
                    "in self.unbatched_inputs"
                    if lists
                    else f"holds tensors whose first dimensions differ: {sizes}. Every "
                    "tensor carries the batch dimension first; list the ones that do not "
                    "(a (seq, seq) mask) in self.unbatched_inputs"
                )
                + (f". {hint}" if (hint := self._positional_list_hint()) else ""),
            )
        if self._is_set("expected_output_shape"):
            expected = tuple(self.expected_output_shape)
            if not expected or expected[0] != self._batch_size():
                raise self._contract_error(
                    "expected_output_shape",
                    f"is {expected}, which does not start with the "
                    f"batch size of self.inputs ({self._batch_size()})",
                )

    # -- calling the model: one convention for every check --------------------------------
    def _positional_list_hint(self) -> str:
        """For a list of tensors in self.inputs itself: that it means positional arguments."""
        if not isinstance(self.inputs, list) or not all(
            isinstance(value, torch.Tensor) for value in self.inputs
        ):
            return ""
        return (
            "A list in self.inputs is the model's positional arguments, one tensor each; "
            "for a model that takes a list of images (torchvision's detection models), "
            "set self.inputs = (images,) or (images, targets)"
        )

    def _batch_size(self) -> int:
        return batch_length(batch_entries(self.inputs, self.unbatched_inputs)[0][1])

    def _has_sample_lists(self) -> bool:
        """Whether an argument of self.inputs carries the batch as a list of samples."""
        return bool(sample_lists(self.inputs, self.unbatched_inputs))

    def _refuse_sample_lists(self, check: str) -> None:
        """A contract error for a check that needs every batched input to be a tensor."""
        found = sample_lists(self.inputs, self.unbatched_inputs)
        if found:
            raise self._contract_error(
                "inputs",
                f"holds {', '.join(describe_batched(key, value) for key, value in found)}: "
                f"{check} needs every batched input as a tensor, batch first, and does not "
                "take lists of samples (ModelTests' own checks do). Stack the samples into a "
                "tensor (padding them to one size), or, if the list is not one item per "
                "sample, list it in self.unbatched_inputs",
            )

    def _inputs_of(self, index: Sequence[int]) -> Any:
        """self.inputs made of its samples ``index``, in that order (repeats allowed): rows
        of each batched tensor, clones of the items of each list of samples."""
        return replace_entries(
            self.inputs,
            {
                key: take_samples(value, index)
                for key, value in batch_entries(self.inputs, self.unbatched_inputs)
            },
        )

    def _varying_shapes(self) -> List[str]:
        """The lists of samples in self.inputs whose samples differ in shape, described."""
        found = []
        for key, samples in sample_lists(self.inputs, self.unbatched_inputs):
            shapes = [
                tuple((path, tuple(t.shape)) for path, t in named_tensors(item, ""))
                for item in samples
            ]
            if len(set(shapes)) == 1:
                continue
            if all(isinstance(item, torch.Tensor) for item in samples):
                seen = ", ".join(dict.fromkeys(str(tuple(t.shape)) for t in samples))
                found.append(f"{describe_input(key)} holds samples of shapes {seen}")
            else:
                found.append(f"{describe_input(key)} holds samples of different shapes")
        return found

    def _other_values_changed(self, sample: int) -> Any:
        """self.inputs with the floating-point values of every sample but ``sample`` changed
        (x -> 2x + 1, which keeps the order of box coordinates), every shape kept."""

        def changed(tensor: torch.Tensor) -> torch.Tensor:
            return tensor * 2 + 1 if tensor.is_floating_point() else tensor.clone()

        new: Dict[Key, Any] = {}
        for key, value in batch_entries(self.inputs, self.unbatched_inputs):
            if isinstance(value, list):
                new[key] = [
                    map_tensors(changed if index != sample else torch.clone, item)
                    for index, item in enumerate(value)
                ]
            else:
                tensor = value.clone()
                if tensor.is_floating_point():
                    others = torch.tensor([i for i in range(len(tensor)) if i != sample])
                    tensor[others] = tensor[others] * 2 + 1
                new[key] = tensor
        return replace_entries(self.inputs, new)

    def _resized_inputs(self, size: int) -> Any:
        """self.inputs with ``size`` samples (repeating samples if needed)."""
        return self._inputs_of([i % self._batch_size() for i in range(size)])

    def _per_sample(self, output: Any, batch: int) -> bool:
        """Whether ``output`` (for ``batch`` samples) is one element per sample: a list
        returned for inputs that carry the batch as a list (torchvision's detection models
        return a list of dicts), unless it is a list of tensors that all have the batch
        first (batched outputs in a list)."""
        if not isinstance(output, list) or not self._has_sample_lists():
            return False
        return not (
            output
            and all(
                isinstance(item, torch.Tensor) and item.dim() > 0 and item.shape[0] == batch
                for item in output
            )
        )

    def _sample_outputs(self, output: List[Any]) -> List[torch.Tensor]:
        """The checked tensor of each element of a per-sample output (chosen by output_key
        in each element, e.g. a detection's "boxes"; by default the element's first)."""
        try:
            return [
                select_tensor(
                    item,
                    self.output_key,
                    f"the model output[{index}]",
                    "output_key",
                    passed_over=self.cross_sample_outputs,
                )
                for index, item in enumerate(output)
            ]
        except TypeError as exc:
            raise ContractError(str(exc)) from None

    def _forward(
        self, model: nn.Module, inputs: Any, training: bool = False, seed: Optional[int] = None
    ) -> Any:
        """``model`` called on ``inputs`` in the given mode, with the RNG seeded (``self.seed``
        unless given) and restored after; every submodule's mode is restored too."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed if seed is None else seed)
            with mode(model, training=training):
                try:
                    return call_model(model, inputs)
                except Exception as exc:
                    if hasattr(exc, "add_note") and not getattr(exc, "_dltestkit_noted", False):
                        exc._dltestkit_noted = True  # type: ignore[attr-defined]
                        exc.add_note(self._call_note(inputs, training))
                    raise

    def _call_note(self, inputs: Any, training: bool) -> str:
        """How the model was called, for an exception raised by the model itself."""
        entries = [
            f"{describe_input(key)}: "
            + (
                str(tuple(value.shape))
                if isinstance(value, torch.Tensor)
                else f"a list of {len(value)}"
                if isinstance(value, list)
                else type(value).__name__
            )
            for key, value in input_entries(inputs)
        ]
        how = (
            "model(**inputs), keyword arguments"
            if isinstance(inputs, dict)
            else "model(*inputs), positional arguments"
            if isinstance(inputs, (tuple, list))
            else "model(inputs)"
        )
        return (
            f"[dltestkit] raised by the model in {describe_mode(training)} mode, called as "
            f"{how}, with {', '.join(entries)}. A tuple in self.inputs is passed as "
            "positional arguments in its order; use a dict for keyword arguments."
            + (f" {hint}." if (hint := self._positional_list_hint()) else "")
        )

    def _copy_model(self, device: Optional[str] = None) -> nn.Module:
        """A deep copy of self.model, moved to ``device`` if given (the checks that train or
        move the model use one)."""
        try:
            copied = copy_module(self.model, device)
        except Exception as exc:
            raise ContractError(
                f"self.model cannot be deep-copied ({type(exc).__name__}: {exc}); the checks "
                "that train, move or convert the model work on a copy, so that your model is "
                "left as it was. Keep open files, locks, generators and other uncopyable "
                "objects out of the model's attributes."
            ) from exc
        return copied if device is None else copied.to(device)

    def _output(self, output: Any) -> torch.Tensor:
        """The checked output tensor (chosen by output_key)."""
        try:
            return select_tensor(
                output,
                self.output_key,
                "the model output",
                "output_key",
                passed_over=self.cross_sample_outputs,
            )
        except TypeError as exc:
            raise ContractError(str(exc)) from None

    def _weights(self, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Fixed random weights, so that no summed output can cancel (e.g. softmax rows)."""
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in like]

    def _loss(self, output: Any) -> torch.Tensor:
        """loss_fn(output), or every floating-point output weighted at random and summed."""
        if self.loss_fn is not None:
            return self.loss_fn(output)
        tensors = [t for _, t in floating_tensors(output)]
        if not tensors:
            raise ContractError(
                "the model output has no floating-point tensor to take "
                "gradients of; set self.loss_fn"
            )
        weights = self._weights(tensors)
        return torch.stack([(t * w).sum() for t, w in zip(tensors, weights)]).sum()

    def _output_hint(self, output: Any) -> str:
        """What to do when the checked output looks wrong and output_key is unset."""
        if self.output_key is not None or isinstance(output, torch.Tensor):
            return ""
        paths = [f"{path} {tuple(t.shape)}" for path, t in named_tensors(output)][:6]
        return (
            f" The checked output is the first element of the {type(output).__name__} "
            f"the model returns ({', '.join(paths)}); set self.output_key to check "
            "another."
        )

    # -- the checks --------------------------------------------------------------------------
    def _on(self, device: str) -> Any:
        return map_tensors(lambda t: t.to(device), self.inputs)

    def _unprobed_inputs(self) -> Collection[Key]:
        """Inputs that are never differentiated."""
        return tuple(self.unbatched_inputs)

    def _probe(
        self, model: nn.Module, inputs: Any = None, required: bool = True
    ) -> Tuple[Any, List[Probe]]:
        """Eval-mode output and probes of ``model`` on ``inputs`` (default: self.inputs).
        Without any probe the check skips, unless ``required`` is False."""
        with mode(model, training=False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            output, probes = probe_forward(
                lambda batch: call_model(model, batch),
                self.inputs if inputs is None else inputs,
                self._batch_size(),
                self._unprobed_inputs(),
            )
        for probe in probes:
            probe.model = model
        if not probes and required:
            self.skipTest(f"no input can be differentiated: {self._unprobed_reason()}")
        return output, probes

    def _unprobed_reason(self) -> str:
        """Why no input of self.inputs could be probed."""
        integers = [
            describe_input(key)
            for key, t in batched_entries(self.inputs, self._unprobed_inputs())
            if not t.is_floating_point()
        ]
        lists = [
            describe_input(key) for key, _ in sample_lists(self.inputs, self._unprobed_inputs())
        ]
        return (
            "self.inputs has no floating-point tensor, and its integer tensors "
            f"({', '.join(integers) or 'none'}) reach no embedding (nn.Embedding, "
            "nn.EmbeddingBag, F.embedding) as they are or as a view (ids.t(), ids[:, 1:]); "
            "ids transformed into a new tensor first (clamped, shifted, offset) cannot be "
            "followed"
            + (
                f" (integer tensors in lists of samples, {', '.join(lists)}, are not "
                "followed to embeddings)"
                if lists
                else ""
            )
        )

    def _probe_gradients(
        self, value: torch.Tensor, probes: Sequence[Probe]
    ) -> List[Optional[torch.Tensor]]:
        """d value / d probe for every probe, None where ``value`` is not computed from it.

        torch.autograd.grad, or, for a model with reentrant gradient checkpointing
        (``use_reentrant=True``, which refuses autograd.grad), ``value.backward()`` reading the
        probes' ``.grad``: in eval mode, as the probes were made, with the gradients that the
        backward pass leaves on the model's parameters taken away again."""
        leaves = [p.tensor for p in probes]
        try:
            return list(torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True))
        except RuntimeError as exc:
            if "use_reentrant=True" not in str(exc):
                raise
        models = {id(p.model): p.model for p in probes if p.model is not None} or {
            id(self.model): self.model
        }
        with contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(mode(model, training=False))
                stack.enter_context(_gradients_set_aside(model.parameters()))
            stack.enter_context(_gradients_set_aside(self._input_leaves()))
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(self.seed)
            for leaf in leaves:
                leaf.grad = None
            torch.autograd.backward(value, retain_graph=True)
            grads = [leaf.grad for leaf in leaves]
            for leaf in leaves:
                leaf.grad = None
        return grads

    def _input_leaves(self) -> List[torch.Tensor]:
        """The tensors of self.inputs that a backward pass could leave a gradient on."""
        return [t for _, t in named_tensors(self.inputs) if t.requires_grad and t.is_leaf]

    def _connected(self, value: torch.Tensor, probes: Sequence[Probe]) -> bool:
        """Whether ``value`` is computed from any probe (in the autograd graph), whatever the
        values: a zero-initialised output layer gives zero gradients but is connected."""
        if not value.requires_grad:
            return False
        return any(grad is not None for grad in self._probe_gradients(value.sum(), probes))

    def _dependence(self, value: torch.Tensor, probes: Sequence[Probe]) -> List[torch.Tensor]:
        """For each probe, where ``value`` depends on it: a bool tensor of the probe's shape,
        True where d value / d probe is non-zero. A NaN there (0 * NaN from an output that is
        not part of ``value``, such as a fully masked padding row) is no evidence of
        dependence and counts as False."""
        if not value.requires_grad:
            return [torch.zeros_like(p.tensor, dtype=torch.bool) for p in probes]
        grads = self._probe_gradients(value, probes)
        return [
            torch.zeros_like(p.tensor, dtype=torch.bool) if g is None else g.ne(0) & g.isfinite()
            for p, g in zip(probes, grads)
        ]

    def _trainable(self, model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def _gradients(
        self, model: nn.Module, trainable: Sequence[Tuple[str, nn.Parameter]], step: int = 0
    ) -> Tuple[Any, List[Optional[torch.Tensor]]]:
        """Output and parameter gradients of one training-mode forward and backward pass.

        ``model`` is the checks' own copy: its ``.grad`` are cleared, then ``loss.backward()``
        fills them (reentrant gradient checkpointing, ``use_reentrant=True``, supports
        backward() only), still in training mode and under the same seed, as the
        checkpointed layers run forward again during the backward pass."""
        for _, parameter in trainable:
            parameter.grad = None
        kept = _gradients_set_aside(self._input_leaves())
        with torch.random.fork_rng(devices=[]), mode(model, training=True), kept:
            output = self._forward(
                model, self.inputs, training=True, seed=derived_seed(self.seed, step)
            )
            loss = self._loss(output)
            if not trainable or not loss.requires_grad:
                return output, [None] * len(trainable)
            torch.manual_seed(derived_seed(self.seed, step))
            torch.autograd.backward(loss)
        return output, [parameter.grad for _, parameter in trainable]

    def _allowed(self, name: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.allowed_unchanged_parameters
        )

    def _no_trainable_parameter(self) -> str:
        return (
            "the model has no trainable parameter (every parameter has "
            "requires_grad=False, or there is none): it cannot learn. Unfreeze the layers "
            "that should train (p.requires_grad_(True)), or skip this check for a model "
            "that is never trained"
        )
