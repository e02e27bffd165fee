"""Per-sample, differentiable views of a model's inputs, for exact dependence checks.

Batch independence, causality and padding invariance all ask "does this output depend on that
input?", answered exactly by back-propagating from the output and testing the input's gradient
for exact zeros. Float inputs are differentiated directly. Integer inputs (token ids) cannot
be, so their embeddings are used instead: while the model runs, every embedding lookup
(``nn.Embedding``, ``F.embedding``) of an integer input, batch dimension first, is replaced by
a leaf tensor with the same values, and the gradient is taken with respect to that leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._tensors import Key, batched_entries, describe_input, replace_entries

__all__ = ["Probe", "probe_forward"]


@dataclass
class Probe:
    """One input, or the embedding of one integer input, as a leaf tensor (batch first)."""

    key: Key
    tensor: torch.Tensor
    embedded: bool
    #: The leaf has the input's leading dimensions, so its positions are the input's.
    aligned: bool
    #: The model whose forward pass made the probe (set by ModelContract._probe).
    model: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        name = describe_input(self.key)
        return f"{name} (through its embedding)" if self.embedded else name


class _EmbeddingProbe(TorchFunctionMode):
    """Replace embedding lookups of the given integer inputs by leaves."""

    def __init__(self, sources: List[Tuple[Key, torch.Tensor]], batch: int) -> None:
        super().__init__()
        self.sources = sources
        self.batch = batch
        self.probes: List[Probe] = []

    def _source(self, indices: Any) -> Optional[Tuple[Key, torch.Tensor]]:
        """The input ``indices`` is a batch-first view of, if any."""
        if not isinstance(indices, torch.Tensor) or indices.dim() == 0:
            return None
        if indices.shape[0] != self.batch:
            return None
        matches = [
            (key, source)
            for key, source in self.sources
            if indices.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
            and indices.stride(0) == source.stride(0)
        ]
        claimed = {probe.key for probe in self.probes}
        # The same tensor passed twice (input_ids as decoder_input_ids): first come, first served.
        unclaimed = [match for match in matches if match[0] not in claimed]
        return (unclaimed or matches)[0] if matches else None

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func is F.embedding:
            indices = args[0] if args else kwargs.get("input")
        elif func is torch.embedding:
            indices = args[1] if len(args) > 1 else kwargs.get("indices")
        else:
            return output
        found = self._source(indices)
        if found is None or indices is None or not output.is_floating_point():
            return output
        key, source = found
        leaf = output.detach().requires_grad_(True)
        self.probes.append(
            Probe(key, leaf, embedded=True, aligned=tuple(indices.shape) == tuple(source.shape))
        )
        return leaf


def probe_forward(
    call: Callable[[Any], Any], inputs: Any, batch: int, skip: Collection[Any] = ()
) -> Tuple[Any, List[Probe]]:
    """Run ``call(inputs)`` with every batched float input (not in ``skip``) as a fresh leaf
    and every embedding of a batched integer input (not in ``skip``) replaced by a leaf.
    Returns the output and the probes, float inputs first."""
    probes: List[Probe] = []
    leaves: Dict[Key, torch.Tensor] = {}
    integers: List[Tuple[Key, torch.Tensor]] = []
    for key, tensor in batched_entries(inputs, skip):
        if tensor.is_floating_point():
            leaves[key] = tensor.detach().clone().requires_grad_(True)
            probes.append(Probe(key, leaves[key], embedded=False, aligned=True))
        elif not tensor.is_complex() and tensor.dtype != torch.bool:
            integers.append((key, tensor))
    mode = _EmbeddingProbe(integers, batch)
    with torch.enable_grad(), mode:
        output = call(replace_entries(inputs, leaves))
    return output, probes + mode.probes
