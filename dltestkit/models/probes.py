"""Per-sample, differentiable views of a model's inputs, for exact dependence checks.

Batch independence, causality and padding invariance all ask "does this output depend on that
input?", answered exactly by back-propagating from the output and testing the input's gradient
for exact zeros. Float inputs are differentiated directly. Integer inputs (token ids) cannot
be, so their embeddings are used instead: while the model runs, every embedding lookup
(``nn.Embedding``, ``F.embedding``, ``nn.EmbeddingBag``, ``F.embedding_bag``) of an integer
input, or of a view of one (``ids.t()``, ``ids[:, 1:]``, ``ids.flatten()``), is replaced by a
leaf tensor with the same values, and the gradient is taken with respect to that leaf.

Which elements of the input a lookup reads is worked out exactly from the memory the view
shares with the input, never guessed from shapes: a probe is made only when every looked-up
id is an element of the input and the samples of the batch can be told apart in the lookup.

An input that carries the batch as a list of samples (torchvision's detection models take a
list of images) gets one leaf per float tensor of each sample, so that which sample a
gradient reaches is exact too; integer tensors in such lists are not followed to embeddings.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.paths import map_tensors, named_tensors
from ..core.watch import Watch
from .tensors import Key, batched_entries, describe_input, replace_entries, sample_lists

__all__ = ["Probe", "probe_forward"]


@dataclass
class Probe:
    """One input, or the embedding of one integer input, as a leaf tensor (batch first)."""

    key: Key
    tensor: torch.Tensor
    embedded: bool
    #: The leaf has the input's leading dimensions, in the input's order, so its positions
    #: are the input's (the sequence checks use aligned probes only).
    aligned: bool
    #: The model whose forward pass made the probe (set by ModelContract._probe).
    model: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)
    #: For an input that is a list of samples: the sample whose tensor the leaf is (the leaf
    #: then has no batch dimension), and the tensor's path in that sample ("['boxes']").
    sample: Optional[int] = None
    within: str = ""
    #: For the embedding of an integer input: the flat (row-major) position in the input of
    #: each id the leaf embeds, in the leaf's leading dimensions (None for a bag's leaf, each
    #: of whose rows embeds several ids).
    positions: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        name = describe_input(self.key)
        if self.sample is not None:
            name = f"{name}[{self.sample}]{self.within}"
        return f"{name} (through its embedding)" if self.embedded else name

    def depends(self, where: torch.Tensor, sample: int) -> bool:
        """Whether ``where`` (True where a value depends on this probe, in its shape) shows
        a dependence on sample ``sample``'s input."""
        if self.sample is not None:
            return self.sample == sample and bool(where.any())
        return bool(where[sample].any())


def _addresses(tensor: torch.Tensor) -> torch.Tensor:
    """The storage offset of every element of ``tensor`` (in elements), in its shape."""
    address = torch.full((1,) * tensor.dim(), tensor.storage_offset(), dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride())):
        shape = [1] * tensor.dim()
        shape[dim] = size
        address = address + (torch.arange(size) * stride).view(shape)
    return address.expand(tensor.shape)


def _positions(view: torch.Tensor, source: torch.Tensor) -> Optional[torch.Tensor]:
    """For every element of ``view``, the flat (row-major) position in ``source`` of the
    element it shares memory with; None unless every element of ``view`` is one of
    ``source``'s (another tensor, another dtype, or elements outside ``source``)."""
    if (
        view.dtype != source.dtype
        or view.device != source.device
        or source.numel() == 0
        or view.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    ):
        return None
    if (view.shape, view.stride(), view.storage_offset()) == (
        source.shape,
        source.stride(),
        source.storage_offset(),
    ):
        return torch.arange(source.numel()).view(source.shape)
    ordered, order = _addresses(source).flatten().sort()
    if bool((ordered[1:] == ordered[:-1]).any()):
        return None  # elements of source share memory (an expanded tensor): ambiguous
    wanted = _addresses(view).flatten()
    found = torch.searchsorted(ordered, wanted).clamp_(max=ordered.numel() - 1)
    if not torch.equal(ordered[found], wanted):
        return None
    return order[found].view(view.shape)


def _along(size: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., size - 1 along ``dim`` of a tensor shaped like ``like``."""
    shape = [1] * like.dim()
    shape[dim] = size
    return torch.arange(size).view(shape).expand(like.shape)


class _EmbeddingProbe(Watch):
    """Replace embedding lookups of the given integer inputs by leaves."""

    def __init__(self, sources: List[Tuple[Key, torch.Tensor]], batch: int) -> None:
        super().__init__()
        self.sources = sources
        self.batch = batch
        self.probes: List[Probe] = []

    def _source(
        self, indices: Any
    ) -> Optional[Tuple[Key, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The input that ``indices`` is a view of, with the position in it of each element of
        ``indices`` and the sample of the batch it belongs to; None if ``indices`` is no view
        of an input."""
        if not isinstance(indices, torch.Tensor) or indices.dim() == 0:
            return None
        matches = []
        for key, source in self.sources:
            positions = _positions(indices, source)
            if positions is not None:
                samples = torch.div(positions, source.numel() // self.batch, rounding_mode="floor")
                matches.append((key, source, positions, samples))
        claimed = {probe.key for probe in self.probes}
        # The same tensor passed twice (input_ids as decoder_input_ids): first come, first served.
        unclaimed = [match for match in matches if match[0] not in claimed]
        if not matches:
            return None
        return (unclaimed or matches)[0]

    def _embedding(self, indices: Any, output: Any) -> Any:
        """A leaf for an embedding lookup ``output`` (shape ``indices.shape + (dim,)``) of a
        view of an input: in the input's layout when the view only permutes its dimensions
        (aligned), else with the view's batch dimension moved first."""
        found = self._source(indices)
        if found is None or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        key, source, positions, samples = found
        extra = list(range(indices.dim(), output.dim()))
        if indices.dim() == source.dim() <= 4:
            base = torch.arange(source.numel()).view(source.shape)
            for order in itertools.permutations(range(source.dim())):
                if torch.equal(base.permute(order), positions):  # indices is source.permute
                    inverse = sorted(range(len(order)), key=order.__getitem__)
                    leaf = output.detach().permute(*inverse, *extra).requires_grad_(True)
                    self.probes.append(
                        Probe(key, leaf, embedded=True, aligned=True, positions=base)
                    )
                    identity = order == tuple(range(len(order)))
                    return _in_place_safe(leaf if identity else leaf.permute(*order, *extra))
        batch_dim = next(
            (
                dim
                for dim in range(indices.dim())
                if indices.shape[dim] == self.batch
                and torch.equal(samples, _along(self.batch, dim, samples))
            ),
            None,
        )
        if batch_dim is None:
            return output  # the samples cannot be told apart in this lookup
        leaf = output.detach().movedim(batch_dim, 0).requires_grad_(True)
        where = positions.movedim(batch_dim, 0)
        self.probes.append(Probe(key, leaf, embedded=True, aligned=False, positions=where))
        return _in_place_safe(leaf.movedim(0, batch_dim))

    def _bag(self, indices: Any, offsets: Any, include_last: bool, output: Any) -> Any:
        """A leaf for an embedding-bag lookup ``output`` (one row per bag) of a view of an
        input, if bag ``b`` is made of sample ``b``'s ids only, for every ``b``."""
        found = self._source(indices)
        if found is None or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        key, _, _, samples = found
        if indices.dim() == 2 and offsets is None:
            bags = _along(indices.shape[0], 0, indices)
            count = indices.shape[0]
        elif indices.dim() == 1 and isinstance(offsets, torch.Tensor) and offsets.dim() == 1:
            count = offsets.numel() - (1 if include_last else 0)
            starts = offsets.to(torch.long)
            bags = torch.searchsorted(starts, torch.arange(indices.numel()), right=True) - 1
        else:
            return output
        if count != self.batch or output.dim() == 0 or output.shape[0] != count:
            return output
        if not torch.equal(samples.flatten(), bags.flatten()):
            return output  # a bag mixes samples, or bags are in another order
        leaf = output.detach().requires_grad_(True)
        self.probes.append(Probe(key, leaf, embedded=True, aligned=False))
        return _in_place_safe(leaf)

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        output = func(*args, **kwargs)
        if func is F.embedding:
            return self._embedding(args[0] if args else kwargs.get("input"), output)
        if func is torch.embedding:
            return self._embedding(args[1] if len(args) > 1 else kwargs.get("indices"), output)
        if func is F.embedding_bag:
            bound = _BAG_SIGNATURE.bind(*args, **kwargs).arguments
            if _differentiated(bound.get("per_sample_weights")):
                return output  # a probe would cut the weights' path
            return self._bag(
                bound["input"],
                bound.get("offsets"),
                bool(bound.get("include_last_offset", False)),
                output,
            )
        if func is torch.embedding_bag and isinstance(output, tuple):
            bound = _ATEN_BAG.bind(*args, **kwargs).arguments
            if _differentiated(bound.get("per_sample_weights")):
                return output
            bag = self._bag(
                bound["indices"],
                bound["offsets"],
                bool(bound.get("include_last_offset", False)),
                output[0],
            )
            return (bag, *output[1:])
        return output


def _in_place_safe(probed: torch.Tensor) -> torch.Tensor:
    """What the model gets in place of an embedding's output: a copy of the probe's leaf (or of
    a view of it), which the model may change in place, as it may the output it stands for
    (BLIP's and other BERT-style embeddings add positions with ``+=``); autograd refuses that
    on a leaf, or a view of one, that requires its gradient."""
    return probed.clone()


def _differentiated(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad


_BAG_SIGNATURE = inspect.signature(F.embedding_bag)


def _aten_bag(
    weight: Any,
    indices: Any,
    offsets: Any,
    scale_grad_by_freq: Any = False,
    mode: Any = 0,
    sparse: Any = False,
    per_sample_weights: Any = None,
    include_last_offset: Any = False,
    padding_idx: Any = None,
) -> None:
    """The signature of torch.embedding_bag (a builtin, which inspect cannot read)."""


_ATEN_BAG = inspect.signature(_aten_bag)


def probe_forward(
    call: Callable[[Any], Any], inputs: Any, batch: int, skip: Collection[Any] = ()
) -> Tuple[Any, List[Probe]]:
    """Run ``call(inputs)`` with every batched float input (not in ``skip``) as a fresh leaf,
    every float tensor of each sample of a list of samples as a fresh leaf of its own, and
    every embedding of a batched integer input (not in ``skip``) replaced by a leaf.
    Returns the output and the probes, float inputs first."""
    probes: List[Probe] = []
    leaves: Dict[Key, Any] = {}
    integers: List[Tuple[Key, torch.Tensor]] = []
    for key, tensor in batched_entries(inputs, skip):
        if tensor.is_floating_point():
            leaves[key] = tensor.detach().clone().requires_grad_(True)
            probes.append(Probe(key, leaves[key], embedded=False, aligned=True))
        elif not tensor.is_complex() and tensor.dtype != torch.bool:
            integers.append((key, tensor))
    for key, samples in sample_lists(inputs, skip):
        leaves[key] = []
        for index, item in enumerate(samples):
            made: List[torch.Tensor] = []

            def leaf(tensor: torch.Tensor, made: List[torch.Tensor] = made) -> torch.Tensor:
                if not tensor.is_floating_point():
                    return tensor
                made.append(tensor.detach().clone().requires_grad_(True))
                return made[-1]

            leaves[key].append(map_tensors(leaf, item))
            for path, tensor in named_tensors(leaves[key][-1], prefix=""):
                if any(tensor is new for new in made):
                    probe = Probe(key, tensor, False, False, sample=index, within=path)
                    probes.append(probe)
    mode = _EmbeddingProbe(integers, batch)
    with torch.enable_grad():
        # the model gets copies of the leaves, which it may change in place as it may change
        # any input (autograd refuses that on a leaf); the gradients reach the leaves
        passed = {key: map_tensors(_copy_of_leaf, value) for key, value in leaves.items()}
        with mode:
            output = call(replace_entries(inputs, passed))
    return output, probes + mode.probes


def _copy_of_leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.requires_grad and tensor.is_leaf else tensor
