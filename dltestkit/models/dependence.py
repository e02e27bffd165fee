"""Where an output depends on the inputs, exactly: the probes (differentiable views of the
inputs, through the embeddings for token ids) and the gradients of an output with respect to
them. Batch independence, causality and padding invariance are built on it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.messages import no_eval_gradients, noted
from ..core.paths import floating_tensors, map_tensors
from ..core.seeds import derived_seed, seed_torch
from .contract import ModelContract
from .copies import gradients_set_aside, mode
from .probes import Probe, probe_forward
from .tensors import Key, batched_entries, call_model, describe_input, sample_lists

__all__ = ["Dependence", "GradientsRefused", "ProbedPass"]


class GradientsRefused(RuntimeError):
    """No gradient can be taken through the eval-mode pass: its forward changed in place a
    tensor that the backward pass needs (a state cache updated in place at evaluation, as
    transformers' RWKV does), or the model's own backward code refuses to run in eval mode
    (transformers' Reformer). The checks then compare values only, saying why."""


def _raise_refused(exc: Exception) -> None:
    """Raise GradientsRefused where ``no_eval_gradients`` explains ``exc`` (an exception of
    the backward pass of an eval-mode pass), else ``exc`` itself."""
    refused = no_eval_gradients(exc)
    if refused is None:
        raise exc
    raise GradientsRefused(refused) from exc


#: The screen for mixed samples scales sample ``j``'s outputs by ``2**j``: for batches up to this
#: size, in dtypes whose exponent range keeps such gradients far from overflow.
_SCREEN_MAX_BATCH = 32
_SCREEN_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@dataclass(frozen=True)
class ProbedPass:
    """What the eval-mode pass over the probes showed (``Dependence._probed_pass``)."""

    #: the outputs, detached
    output: Any
    #: the probes, their tensors detached and without their model (what they describe)
    probes: Tuple[Probe, ...]
    #: d (every floating-point output, weighted) / d probe (None: not computed from it);
    #: None when no gradient was taken
    read: Optional[Tuple[Optional[torch.Tensor], ...]]
    #: the screen for mixed samples of the checked output: (connected, certainly not mixed)
    screen: Optional[Tuple[bool, bool]]
    #: why no gradient can be taken through the pass (GradientsRefused), if none can
    refused: Optional[str] = None


class Dependence(ModelContract):
    """The helpers of the checks that ask whether an output depends on an input."""

    def _unprobed_inputs(self) -> Collection[Key]:
        """Inputs that are never differentiated."""
        return tuple(self.unbatched_inputs)

    def _padded_elements(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """True at the elements of a batched input that are padding; None: no padding is
        known (SequenceModelTests knows it from padding_mask)."""
        return None

    def _probe(
        self, model: nn.Module, inputs: Any = None, required: bool = True
    ) -> Tuple[Any, List[Probe]]:
        """Eval-mode output and probes of ``model`` on ``inputs`` (default: self.inputs).
        Without any probe the check skips, unless ``required`` is False."""
        called = self.inputs if inputs is None else inputs
        with mode(model, training=False), torch.random.fork_rng(devices=[]):
            seed_torch(self.seed)
            with noted(lambda: self._call_note(called, False)):
                output, probes = probe_forward(
                    lambda batch: call_model(model, batch),
                    called,
                    self._batch_size(),
                    self._unprobed_inputs(),
                )
        for probe in probes:
            probe.model = model
        if not probes and required:
            self.skipTest(f"no input can be differentiated: {self._unprobed_reason()}")
        return output, probes

    def _unprobed_reason(self) -> str:
        """Why no input of self.inputs could be probed (or its gradients not be taken)."""
        refused: Optional[str] = getattr(self, "_refused_gradients", None)
        if refused:
            return refused
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

    def _judged_by_values(self, refused: GradientsRefused, how: str) -> None:
        """Note that no gradient can be taken (``refused``, which _unprobed_reason then gives)
        and report the gradient part of the check as skipped, ``how`` the values judge."""
        self._refused_gradients = str(refused)
        self._skip_part("gradients", f"{refused}; {how}")

    @contextlib.contextmanager
    def _as_probed(self, probes: Sequence[Probe]) -> Iterator[List[nn.Module]]:
        """The state the probes' forward pass ran in, for a backward pass through it: the
        probed models in eval mode and torch's generator seeded with self.seed (restored
        after). Gradient checkpointing runs the checkpointed forward again during the
        backward pass, reading the modes then: in training mode, BatchNorm would update the
        model's running statistics and save other tensors than the forward pass did (which
        torch.utils.checkpoint refuses). Yields the models."""
        models = {id(p.model): p.model for p in probes if p.model is not None} or {
            id(self.model): self.model
        }
        with contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(mode(model, training=False))
            stack.enter_context(torch.random.fork_rng(devices=[]))
            seed_torch(self.seed)
            yield list(models.values())

    def _with_zero_parameters_made_random(self) -> Optional[nn.Module]:
        """A copy of the model whose trainable parameters that are exactly zero (a ReZero
        gate, LoRA's B, a zero-initialised head) are small random numbers, an input behind
        such a parameter being read as soon as it trains; None if the model has none.

        Its other parameters are the model's own, shared (not copied: a large model's
        weights would cost more than a pass); the copy is only run in eval mode, which
        changes no parameter, and _Judge.fresh copies it in full for a training pass."""
        zeros = {  # (all(): whether every element is non-zero, without a mask of each)
            name: parameter == 0
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad and parameter.is_floating_point() and not parameter.all()
        }
        if not zeros:
            return None
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 4099))
        given: Dict[int, Any] = {}
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                if name not in zeros:
                    given[id(parameter)] = parameter
                    continue
                made = copy.deepcopy(parameter)
                count = int(zeros[name].sum())
                noise = torch.randn(count, generator=generator, dtype=torch.float64)
                made[zeros[name]] = (0.1 * noise).to(made.dtype)
                given[id(parameter)] = made
        return self._copy_model(given=given)

    def _probed_pass(self) -> "ProbedPass":
        """The eval-mode pass over the probes of self.model (``_probe``) that
        test_all_inputs_used and test_batch_independence share, and what its gradients show:
        the gradient of every floating-point output weighted at random (``_weights``) with
        respect to each probe, and the screen for mixed samples of the checked output
        (``_screened_independence``; its first gradient is that one where the checked output
        is the only floating-point output). Computed once per state of the model and inputs."""

        def compute() -> ProbedPass:
            output, probes = self._probe(self.model, required=False)
            tensors = [t for _, t in floating_tensors(output) if t.requires_grad]
            read: Optional[List[Optional[torch.Tensor]]] = None
            screen, refused = None, None
            try:
                read = self._read_gradients(tensors, probes)
                if read is not None:
                    screen = self._shared_screen(output, tensors, probes, read)
            except GradientsRefused as exc:
                refused = str(exc)
            return ProbedPass(
                map_tensors(lambda t: t.detach(), output),
                tuple(dataclasses.replace(p, tensor=p.tensor.detach(), model=None) for p in probes),
                None if read is None else tuple(read),
                screen,
                refused,
            )

        return self._shared_pass("probed", compute, tuple(self._unprobed_inputs()), self.output_key)

    def _read_gradients(
        self, tensors: Sequence[torch.Tensor], probes: Sequence[Probe]
    ) -> Optional[List[Optional[torch.Tensor]]]:
        """d (``tensors``, the outputs, weighted at random and summed) / d probe for every
        probe (``_probe_gradients``); None without any output or probe."""
        if not tensors or not probes:
            return None
        return self._probe_gradients(self._weighted_sum(tensors), probes)

    def _shared_screen(
        self,
        output: Any,
        tensors: List[torch.Tensor],
        probes: Sequence[Probe],
        read: Sequence[Optional[torch.Tensor]],
    ) -> Optional[Tuple[bool, bool]]:
        """test_batch_independence's screen of the checked output (a tensor, batch first),
        or None where it has no such output (a list per sample; then it runs its own)."""
        batch = self._batch_size()
        if self._per_sample(output, batch):
            return None
        try:
            checked = self._output(output)
        except Exception:  # (test_batch_independence reports it)
            return None
        if checked.dim() == 0 or checked.shape[0] != batch or not checked.requires_grad:
            return None
        weights = self._weights([checked])[0]
        alone = len(tensors) == 1 and tensors[0] is checked  # then read is the first gradient
        return self._screened_independence(checked, weights, probes, read if alone else None)

    def _checked_output(
        self, output: Any
    ) -> Tuple[bool, torch.Tensor, List[torch.Tensor], Callable[[int], torch.Tensor]]:
        """What the gradients compare, from the eval-mode ``output``: whether it is one
        element per sample, the checked output (for one element per sample, each sample's
        weighted sum), its random weights, and the sum of the outputs of all samples but
        one. Fails where it is not one output per sample."""
        batch = self._batch_size()
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

        return per_sample, checked, weights, others_output

    def _probe_gradients(
        self, value: torch.Tensor, probes: Sequence[Probe]
    ) -> List[Optional[torch.Tensor]]:
        """d value / d probe for every probe, None where ``value`` is not computed from it.

        torch.autograd.grad, or, for a model with reentrant gradient checkpointing
        (``use_reentrant=True``, which refuses autograd.grad), ``value.backward()`` reading the
        probes' ``.grad``, with the gradients that the backward pass leaves on the model's
        parameters taken away again; either in the state the probes were made in
        (``_as_probed``)."""
        leaves = [p.tensor for p in probes]
        try:
            with self._as_probed(probes):
                return list(
                    torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
                )
        except Exception as exc:
            if not (isinstance(exc, RuntimeError) and "use_reentrant=True" in str(exc)):
                _raise_refused(exc)
        with contextlib.ExitStack() as stack:
            for model in stack.enter_context(self._as_probed(probes)):
                stack.enter_context(gradients_set_aside(model.parameters()))
            stack.enter_context(gradients_set_aside(self._input_leaves()))
            for leaf in leaves:
                leaf.grad = None
            try:
                torch.autograd.backward(value, retain_graph=True)
            except Exception as exc:
                _raise_refused(exc)
            grads = [leaf.grad for leaf in leaves]
            for leaf in leaves:
                leaf.grad = None
        return grads

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
        return self._nonzero(self._probe_gradients(value, probes), probes)

    def _screened_independence(
        self,
        value: torch.Tensor,
        weights: torch.Tensor,
        probes: Sequence[Probe],
        first: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> Optional[Tuple[bool, bool]]:
        """Whether ``value`` (batch first) is computed from any probe, and whether the samples
        are certainly not mixed, from two backward passes instead of one per sample: the
        gradients of ``(value * weights).sum()`` and of the same with sample ``j``'s rows
        scaled by ``2**j``. A backward pass is linear in the gradient it is handed and
        scaling by a power of two is exact, so where no other sample's output depends on
        sample ``i``'s input, the second gradient is exactly ``2**i`` times the first at
        sample ``i``'s elements, bit for bit; a difference anywhere (a dependence, or a
        backward pass that is not linear) leaves the judgement to the exact comparison
        (``_batched_dependence``): (connected, False). None when the screen cannot run (a
        batch over _SCREEN_MAX_BATCH, another dtype, reentrant gradient checkpointing).
        ``first``: the gradients of ``(value * weights).sum()``, taken already."""
        batch = value.shape[0]
        dtypes = {value.dtype, *(p.tensor.dtype for p in probes)}
        if batch > _SCREEN_MAX_BATCH or not dtypes <= set(_SCREEN_DTYPES):
            return None
        scale = torch.pow(2.0, torch.arange(batch, dtype=torch.float64))
        rows = scale.to(value.dtype).view((batch,) + (1,) * (value.dim() - 1))
        leaves = [p.tensor for p in probes]
        grads: List[List[Optional[torch.Tensor]]] = [] if first is None else [list(first)]
        try:
            with self._as_probed(probes):
                for out in (weights, weights * rows)[len(grads) :]:
                    grads.append(
                        list(
                            torch.autograd.grad(
                                value,
                                leaves,
                                grad_outputs=out,
                                retain_graph=True,
                                allow_unused=True,
                            )
                        )
                    )
        except RuntimeError:
            return None
        first, second = grads
        connected = any(grad is not None for grad in first)
        for probe, plain, scaled in zip(probes, first, second):
            if plain is None or scaled is None:
                if plain is not scaled:
                    return connected, False
                continue
            if probe.sample is not None:
                factor = scale[probe.sample].to(plain.dtype)
            elif plain.dim() and plain.shape[0] == batch:
                factor = scale.to(plain.dtype).view((batch,) + (1,) * (plain.dim() - 1))
            else:
                return connected, False
            if not torch.equal(scaled, plain * factor):
                return connected, False
        return connected, True

    def _batched_dependence(
        self, value: torch.Tensor, grad_outputs: torch.Tensor, probes: Sequence[Probe]
    ) -> Optional[Tuple[bool, List[List[torch.Tensor]]]]:
        """For each row ``r`` of ``grad_outputs``: where ``(value * r).sum()`` depends on each
        probe (as ``_dependence`` says), from one backward pass batched over the rows
        (``torch.autograd.grad(..., is_grads_batched=True)``) instead of one pass per row;
        first, whether ``value`` is computed from any probe (``_connected``). None when the
        batched pass cannot run (an operation without a batching rule, an autograd.Function
        without one, reentrant gradient checkpointing): make one pass per row then."""
        if not value.requires_grad:
            return None
        try:
            with warnings.catch_warnings(), self._as_probed(probes):
                warnings.simplefilter("ignore")  # (a batching rule missing: slower, still right)
                grads = torch.autograd.grad(
                    value,
                    [p.tensor for p in probes],
                    grad_outputs=grad_outputs,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        except Exception:
            return None
        return any(grad is not None for grad in grads), [
            self._nonzero([None if grad is None else grad[row] for grad in grads], probes)
            for row in range(len(grad_outputs))
        ]

    @staticmethod
    def _nonzero(
        grads: Sequence[Optional[torch.Tensor]], probes: Sequence[Probe]
    ) -> List[torch.Tensor]:
        """Where each probe's gradient ``grads`` shows a dependence (see ``_dependence``)."""
        return [
            torch.zeros_like(p.tensor, dtype=torch.bool) if g is None else g.ne(0) & g.isfinite()
            for p, g in zip(probes, grads)
        ]
