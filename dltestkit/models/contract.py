"""The model contract: the options every model check reads, and how the checks call the model.

Every model check goes through the helpers here: ``_forward`` calls the model on (a variant of)
``self.inputs`` in the one way the contract defines, ``_output`` picks the checked output,
``_loss`` makes the default loss from every floating-point output, ``_gradients`` runs one
training step's forward and backward pass on a copy.

Passes that several checks need are shared between them (``passes.py``): ``_eval_pass`` (the
seeded eval-mode outputs of ``self.model``), ``_training_pass`` (what the first training step
of a copy shows), and any other through ``_shared_pass``.
"""

from __future__ import annotations

import contextlib
from typing import (
    Any,
    Callable,
    ClassVar,
    Collection,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import torch
from torch import nn

from ..core.contract import CheckMixin
from ..core.messages import listed, noted
from ..core.options import REQUIRED, ContractError, option
from ..core.paths import floating_tensors, map_tensors, named_tensors
from ..core.seeds import derived_seed, generator_states, generators_drawn, seed_torch
from ..core.settings import Settings
from ..core.validators import is_callable, is_instance, is_keys, optional
from .copies import (
    changed_copies,
    copy_module,
    describe_mode,
    gradients_set_aside,
    input_copies,
    mode,
    plain_values,
)
from .norm_calls import ForwardObservation, TrainingForward
from .passes import TrainingPass, shared_pass, stored_pass
from .tensors import (
    Key,
    batch_entries,
    batch_length,
    call_model,
    describe_batched,
    describe_input,
    differing_batches,
    input_entries,
    replace_entries,
    sample_lists,
    select_tensor,
    take_samples,
)

__all__ = ["ModelContract"]

T = TypeVar("T")


def _is_inputs(value: Any) -> Optional[str]:
    if isinstance(value, (torch.Tensor, tuple, list, dict)):
        return None
    return (
        f"is a {type(value).__name__}, not a tensor, a tuple of positional arguments or "
        "a dict of keyword arguments"
    )


class ModelContract(CheckMixin):
    """The contract of the model mixins (ModelTests, SequenceModelTests,
    DistributedModelTests), and how their checks call the model: with ``self.inputs`` as
    your code passes them (see ``ModelTests``)."""

    _suite: ClassVar[str] = "ModelTests"

    model: nn.Module = option(
        REQUIRED, is_instance(nn.Module, description="a torch.nn.Module"), example="MyModel()"
    )
    """The model under test, on the CPU."""
    inputs: Any = option(REQUIRED, _is_inputs, example="torch.randn(4, 3, 32, 32)")
    """One batch of inputs, batch dimension first.

    A tensor is passed as `model(inputs)`, a tuple or list as positional arguments `model(*inputs)`,
    a dict as keyword arguments `model(**inputs)`, e.g. `{"input_ids": ids, "attention_mask":
    mask}`. Every tensor with a dimension carries the batch dimension first, and an argument that is
    a list of tensors or of dicts of tensors carries it as the list, one item per sample (images of
    different sizes, target dicts: `(images, targets)` for torchvision's detection models), except
    those in `unbatched_inputs`. 2 to 8 samples."""
    unbatched_inputs: Collection[Key] = option((), is_keys, example='["mask"]')
    """The keys or indices of inputs without a batch dimension.

    They are passed unchanged at every batch size and never differentiated, e.g. the `(seq, seq)`
    causal mask of `nn.TransformerEncoder`."""
    output_key: Key = option(
        None,
        optional(is_instance(int, str, description="an int index or a str key")),
        example='"last_hidden_state"',
    )
    """The index or key of the checked output tensor.

    `None`: a tensor output itself, else the first element of a tuple, dict, `ModelOutput` or
    dataclass (e.g. `logits`). For a list returned with one element per sample (for a list of
    samples in `inputs`), the index or key in each element (`"scores"` of a detection). The checked
    output is what the shape, batch-independence and sequence checks look at; the gradient checks
    use every floating-point output."""
    cross_sample_outputs: Collection[Key] = option(
        (), is_keys, example='["logits_per_image", "logits_per_text"]'
    )
    """The keys or indices of outputs that compare the samples of the batch with one another by
    design.

    A contrastive model's similarity matrix (CLIP's `logits_per_image`), scores against in-batch
    negatives: `test_batch_independence` does not compare them, and the checked output, when
    `output_key` is `None`, is the first element not listed. With `output_key` set, only that output
    is compared."""
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = option(
        None, optional(is_callable), example="lambda out: out.logits.square().mean()"
    )
    """A function of the model output giving the scalar loss.

    `None`: every floating-point tensor of the output, weighted with fixed random weights (so that
    nothing cancels, as a plain sum of softmax rows would) and summed."""

    # -- the contract across attributes --------------------------------------------------
    def _validate_combination(self) -> None:
        super()._validate_combination()
        self._refuse_meta()
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
        if any(batch_length(value) == 0 for _, value in entries):
            raise self._contract_error(
                "inputs",
                f"holds an empty batch ({sizes}): the checks compare the outputs of samples, "
                "and there is none",
            )
        if len({batch_length(value) for _, value in entries}) > 1:
            lists = bool(sample_lists(self.inputs, self.unbatched_inputs))
            raise self._contract_error(
                "inputs", differing_batches(sizes, lists, self._positional_list_hint())
            )

    def _refuse_meta(self) -> None:
        """A ContractError for a model or inputs on the meta device: they hold no values, so
        nothing can be computed or compared (test_device_moving moves a copy there itself)."""
        on_meta = [
            name
            for name, tensor in (
                *self.model.named_parameters(),
                *self.model.named_buffers(),
            )
            if tensor.is_meta
        ]
        if on_meta:
            raise self._contract_error(
                "model",
                f"is on the meta device ({listed(on_meta)} hold no values: built under "
                "torch.device('meta'), or with init_empty_weights, and never materialised); "
                "the checks compute with the model. Build it on the CPU, or load its weights "
                "(model.to_empty(device='cpu') then load_state_dict)",
            )
        meta_inputs = [path for path, tensor in named_tensors(self.inputs) if tensor.is_meta]
        if meta_inputs:
            raise self._contract_error(
                "inputs",
                f"holds tensors on the meta device ({listed(meta_inputs)}), which hold no "
                "values; the checks compute with them. Make them on the CPU (test_device_moving "
                "moves copies to the meta device itself)",
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

    def _on_few_samples(self, run: Callable[[Any], T], count: int = 1) -> T:
        """``run(inputs)`` on the first ``count`` samples of self.inputs, for a pass that only
        observes what the model calls (which does not depend on the batch): cheaper, where
        self.inputs holds more; on self.inputs itself where it does not, or where the pass on
        fewer samples raises (a layer that needs more than one sample), so that whatever is
        reported is what self.inputs shows."""
        if self._batch_size() > count:
            try:
                return run(self._inputs_of(range(count)))
            except Exception:  # (self.inputs show it, if it is the model's)
                pass
        return run(self.inputs)

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
        self,
        model: nn.Module,
        inputs: Any,
        training: bool = False,
        seed: Optional[int] = None,
        copied: bool = False,
        drew: Optional[List[bool]] = None,
    ) -> Any:
        """``model`` called on ``inputs`` in the given mode, with the RNG seeded (``self.seed``
        unless given) and restored after; every submodule's mode is restored too. ``copied``:
        ``inputs`` are copies already (``input_copies``), passed as they are. ``drew``: a list
        to append whether the call drew from a global generator (torch's CPU generator,
        NumPy's or Python's: its state moved)."""
        with torch.random.fork_rng(devices=[]):
            seed_torch(self.seed if seed is None else seed)
            seeded = generator_states() if drew is not None else None
            with mode(model, training=training):
                settings = Settings.capture()
                try:
                    with noted(lambda: self._call_note(inputs, training)):
                        output = call_model(model, inputs if copied else input_copies(inputs))
                finally:
                    self._note_settings(model, settings)
            if seeded is not None and drew is not None:
                drew.append(bool(generators_drawn(seeded)))
        if output is None:
            self.fail(self._none_returned(training))
        return output

    def _note_settings(self, model: nn.Module, before: Settings) -> None:
        """Put back the global settings a forward pass changed (default dtype, grad mode,
        ...), and note the change for the check's message: the next call starts as this one
        did."""
        changes = before.changes(Settings.capture())
        if changes:
            before.restore()
            self._settings_changes = getattr(self, "_settings_changes", []) + [
                f"{change}, by the forward of {type(model).__name__}" for change in changes
            ]

    def _none_returned(self, training: bool) -> str:
        return (
            f"the model's forward returned None (in {describe_mode(training)} mode): a missing "
            "return statement? Every check needs an output: return the output tensor (or a "
            "tuple, dict or ModelOutput holding it)."
        )

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

    def _copy_model(
        self,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        given: Optional[Dict[int, Any]] = None,
    ) -> nn.Module:
        """A deep copy of self.model, moved to ``device`` and converted to ``dtype`` if given
        (the checks that train, move or convert the model use one); on ``meta`` or in another
        dtype, made so without a copy of the weights first. ``given``: objects the copy holds
        instead of the model's (``copy_module``)."""
        try:
            copied = copy_module(self.model, device, dtype, given)
        except Exception as exc:
            raise ContractError(
                f"self.model cannot be deep-copied ({type(exc).__name__}: {exc}); the checks "
                "that train, move or convert the model work on a copy, so that your model is "
                "left as it was. Keep open files, locks, generators and other uncopyable "
                "objects out of the model's attributes."
            ) from exc
        if device is not None:
            copied = copied.to(device)
        return copied if dtype is None else copied.to(dtype)

    def _output(self, output: Any) -> torch.Tensor:
        """The checked output tensor (chosen by output_key)."""
        if output is None:
            self.fail(self._none_returned(self.model.training))
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
        if output is None:
            self.fail(self._none_returned(training=True))
        tensors = [t for _, t in floating_tensors(output)]
        if not tensors:
            raise ContractError(
                "the model output has no floating-point tensor to take "
                "gradients of; set self.loss_fn"
            )
        return self._weighted_sum(tensors)

    def _weighted_sum(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The tensors, each weighted at random (``_weights``), summed into one value."""
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

    def _input_leaves(self) -> List[torch.Tensor]:
        """The tensors of self.inputs that a backward pass could leave a gradient on."""
        return [t for _, t in named_tensors(self.inputs) if t.requires_grad and t.is_leaf]

    def _trainable(self, model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        """The parameters that need a gradient and hold a value (one of no element, as
        DINOv3's register tokens when there are none, has nothing to train or compare)."""
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.numel()]

    def _gradients(
        self, model: nn.Module, trainable: Sequence[Tuple[str, nn.Parameter]], step: int = 0
    ) -> Tuple[Any, List[Optional[torch.Tensor]]]:
        """Output and parameter gradients of one training pass (``_training_step``)."""
        output, _, grads = self._training_step(model, trainable, step)
        return output, grads

    def _training_step(
        self,
        model: nn.Module,
        trainable: Sequence[Tuple[str, nn.Parameter]],
        step: int = 0,
        after_forward: Optional[Callable[[], None]] = None,
        changed_inputs: Optional[List[str]] = None,
        observed: Optional[List[TrainingForward]] = None,
        inputs: Any = None,
    ) -> Tuple[Any, Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
        """Output, loss and parameter gradients of one training-mode forward and backward pass
        (``after_forward()`` called between the two). ``changed_inputs``: a list to extend
        with the copies of the inputs the pass changed (``changed_copies``); ``observed``:
        a list to append what the forward pass showed to (norm_calls.TrainingForward);
        ``inputs``: other inputs than self.inputs.

        ``model`` is the checks' own copy: its ``.grad`` are cleared, then ``loss.backward()``
        fills them (reentrant gradient checkpointing, ``use_reentrant=True``, supports
        backward() only), still in training mode and under the same seed, as the
        checkpointed layers run forward again during the backward pass."""
        for _, parameter in trainable:
            parameter.grad = None
        kept = gradients_set_aside(self._input_leaves())
        with torch.random.fork_rng(devices=[]), mode(model, training=True), kept:
            copies = input_copies(self.inputs if inputs is None else inputs)
            before = plain_values(copies) if changed_inputs is not None else {}
            observation = ForwardObservation(model) if observed is not None else None
            with observation if observation is not None else contextlib.nullcontext():
                output = self._forward(
                    model, copies, training=True, seed=derived_seed(self.seed, step), copied=True
                )
            if observation is not None and observed is not None:
                observed.append(observation.result(output))
            if after_forward is not None:
                after_forward()
            loss = self._loss(output)
            if trainable and loss.requires_grad:
                seed_torch(derived_seed(self.seed, step))
                torch.autograd.backward(loss)
            if changed_inputs is not None:
                changed_inputs.extend(changed_copies(copies, before))
        if not trainable or not loss.requires_grad:
            return output, loss, [None] * len(trainable)
        return output, loss, [parameter.grad for _, parameter in trainable]

    # -- passes shared by the checks of a test class (passes.py) ------------------------------
    def _shared_pass(
        self, name: str, compute: Callable[[], T], *depends_on: Any, recompute: bool = False
    ) -> T:
        """``compute()``, a pass over self.model and self.inputs that the checks of a test
        class share: computed once per state of the model and the inputs (and of
        ``depends_on``: the options it reads besides model and inputs, e.g. loss_fn), each
        caller getting its own copy of the result's tensors. ``name`` tells passes apart;
        ``recompute``: compute it anyway (a check that needs what the pass leaves behind, such
        as the trained copy) and share the result. See passes.py for what the key holds."""
        return shared_pass(
            type(self), name, (self.model, self.inputs, self.seed, *depends_on), compute, recompute
        )

    def _shared_training_pass(
        self, compute: Callable[[], TrainingPass], recompute: bool = False
    ) -> TrainingPass:
        """The first training step the checks share (``_shared_pass`` "training", which
        depends on loss_fn too), what its forward pass showed shared on its own, without
        loss_fn (``_training_forward``)."""
        return shared_pass(
            type(self),
            "training",
            (self.model, self.inputs, self.seed, self.loss_fn),
            compute,
            recompute,
            ("training forward", lambda done: done.forward),
        )

    def _training_forward(self) -> Optional[TrainingForward]:
        """What the forward pass of the first training step showed, if a check of the class
        ran that step on this model and these inputs (nothing is computed here)."""
        found: Optional[TrainingForward] = stored_pass(
            type(self), "training forward", (self.model, self.inputs, self.seed)
        )
        return found

    def _stored_eval_pass(self) -> Optional[Any]:
        """The eval pass the checks share (``_eval_pass``), if a check of the class ran it
        on this model and these inputs (nothing is computed here)."""
        found = stored_pass(type(self), "eval", (self.model, self.inputs, self.seed))
        return None if found is None else found[0]

    def _eval_pass(self) -> Any:
        """self.model's eval-mode outputs on self.inputs under self.seed, without gradients:
        what ``self._forward(self.model, self.inputs)`` gives under ``torch.no_grad()``,
        shared by the checks."""

        return self._eval_pass_and_changed_inputs()[0]

    def _eval_pass_and_changed_inputs(self) -> Tuple[Any, Tuple[str, ...]]:
        """The eval pass (``_eval_pass``), and the paths (as ``named_tensors(inputs,
        prefix="")`` names them) of the copies of the inputs' plain (strided
        ``torch.Tensor``) tensors that it changed in place: test_inputs_unchanged reads them
        instead of a pass of its own."""

        def compute() -> Tuple[Any, Tuple[str, ...]]:
            with torch.no_grad():
                copies = input_copies(self.inputs)
                before = plain_values(copies)
                output = self._forward(self.model, copies, copied=True)
            return output, changed_copies(copies, before)

        return self._shared_pass("eval", compute)

    def _training_pass(self) -> TrainingPass:
        """What the first training step shows: one training-mode forward and backward pass of
        a copy of self.model on self.inputs (the loss from loss_fn or ``_loss``, the seed
        ``derived_seed(self.seed, 0)``), its output, loss and each trainable parameter's
        gradient (reached, finite, non-zero), shared by the checks."""
        return self._shared_training_pass(self._first_training_step)

    def _first_training_step(self) -> TrainingPass:
        model = self._copy_model()
        first, _ = self._first_step_on(model, self._trainable(model))
        return first

    def _first_step_on(
        self, model: nn.Module, trainable: List[Tuple[str, nn.Parameter]]
    ) -> Tuple[TrainingPass, List[Optional[torch.Tensor]]]:
        """The first training step on ``model`` (a copy), as the checks share it, and the
        parameters' gradients."""
        changed: List[str] = []
        observed: List[TrainingForward] = []
        output, loss, grads = self._training_step(
            model, trainable, changed_inputs=changed, observed=observed
        )
        names = [name for name, _ in trainable]
        return TrainingPass.of(output, loss, names, grads, changed, observed[0]), grads
