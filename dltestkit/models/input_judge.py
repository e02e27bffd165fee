"""The judge of test_all_inputs_used: changes elements of the inputs and compares the outputs
of one model, exactly, under the seeds that tell a model that reads at random."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..core.paths import named_tensors
from .copies import copy_module
from .input_parts import Slabs, Target, changeable, same_outputs, ways
from .randomness import RandomDraw

__all__ = ["Judge"]

#: Slabs judged one by one by values, at most, for one input (beyond: a skipped part).
_SLABS_BY_VALUE = 16

#: Of those, the seeds compared under until an index has been seen read at random (read
#: under a later seed than the check's): a model that draws random numbers for another reason
#: (a VAE's sampling, dropout kept on) reads the same elements under every seed.
_SEEDS_BEFORE_EVIDENCE = 3


class Judge:
    """Changes elements of self.inputs and compares the outputs of one model (the model under
    test, or a copy whose zero parameters are random): exactly, under the seeds that tell a
    model reading at random. ``test``: the InputUse test case (which imports this module)."""

    def __init__(self, test: Any, model: nn.Module) -> None:
        self.test = test
        self.model = model
        self._seeds: Optional[List[int]] = None
        self._bases: Dict[int, List[Tuple[str, torch.Tensor]]] = {}
        #: What an eval-mode pass draws random numbers with (watched when seeds are asked for).
        self.draws: List[RandomDraw] = []
        #: For each index read under another seed than the check's (judged alone): how many
        #: seeds after the check's it took to be read. Evidence of reading at random.
        self.read_after: List[int] = []
        #: Whether every seed is compared under (set once reading at random was seen).
        self.every_seed = False

    @property
    def seeds(self) -> List[int]:
        """The seeds the outputs are compared under: the check's, and _RANDOM_SEEDS - 1 more
        when the model draws random numbers in eval mode (seen in a watched pass, run only
        when a change makes no difference under the check's seed)."""
        if self._seeds is None:
            self.draws = self.test._draws_in_eval(self.model)
            self._seeds = self.test._seeds_for_values(bool(self.draws))
        return self._seeds

    def _compared_seeds(self) -> Iterator[int]:
        """The check's seed, then the others (worked out only when asked for): beyond the
        first _SEEDS_BEFORE_EVIDENCE, only once an index has been seen read at random."""
        yield self.test.seed
        for position, seed in enumerate(self.seeds[1:], start=1):
            if position >= _SEEDS_BEFORE_EVIDENCE and not (self.every_seed or self.read_after):
                return
            yield seed

    def base(self, seed: int) -> List[Tuple[str, torch.Tensor]]:
        """The outputs for self.inputs under ``seed`` (under the check's seed, on the model
        under test, the eval pass the checks share)."""
        if seed not in self._bases:
            test = self.test
            self._bases[seed] = (
                list(named_tensors(test._eval_pass()))
                if self.model is test.model and seed == test.seed
                else test._outputs(self.model, test.inputs, seed)
            )
        return self._bases[seed]

    def changes(
        self, changes: List[Tuple[Target, torch.Tensor]], alone: bool = False
    ) -> Optional[bool]:
        """Whether changing the elements ``changes`` (target, mask) changes some output, under
        any seed and any way of changing them; None when there is nothing to change (empty
        tensors). A model that raises on the changed values reads them. ``alone``: one index,
        whose seeds until it is read are noted (``read_after``)."""
        changes = [(target, mask) for target, mask in changes if changeable(target.tensor)]
        if not changes:
            return None
        for way in ways(changes):
            inputs = self.test._inputs_with_changes(changes, way)
            for tried, seed in enumerate(self._compared_seeds()):
                try:
                    outputs = self.test._outputs(self.model, inputs, seed)
                except Exception:  # the model checks the values: it reads them
                    return True
                if not same_outputs(outputs, self.base(seed)):
                    if alone and tried:
                        self.read_after.append(tried)
                    return True
        return False

    def reads_whole(self, group: List[Slabs]) -> Optional[bool]:
        """Whether the model reads an input (its targets ``group``) in eval mode, or else in
        training mode (targets that only a loss reads); None when it has no element."""
        changes = [(slabs.target, slabs.target.judged()) for slabs in group]
        changed = self.changes(changes)
        if changed is not False:
            return changed
        test = self.test
        changes = [(target, mask) for target, mask in changes if changeable(target.tensor)]
        for way in ways(changes):
            inputs = test._inputs_with_changes(changes, way)
            trained = test._outputs(self.fresh(), test.inputs, test.seed, training=True)
            try:
                again = test._outputs(self.fresh(), inputs, test.seed, training=True)
            except Exception:  # the model checks the values: it reads them
                return True
            if not same_outputs(trained, again):
                return True
        return False

    def fresh(self) -> nn.Module:
        """A copy of the judged model of its own, for a training-mode pass (which changes
        state: BatchNorm's statistics), its parameters copied too."""
        if self.model is self.test.model:
            copy: nn.Module = self.test._copy_model()
            return copy
        return copy_module(self.model)

    def unread_slabs(self, group: List[Slabs]) -> List[Slabs]:
        """The slabs of one target (``group``) that change no output: all of them at once
        first, then one group of indices at a time, then one index at a time (at most
        _SLABS_BY_VALUE of them; beyond, a skipped part)."""
        target = group[0].target
        together = torch.zeros(target.tensor.shape, dtype=torch.bool)
        for slabs in group:
            together |= slabs.mask()
        changed = self.changes([(target, together)])
        if changed is None:
            return []
        if not changed:
            return group
        unread = []
        for slabs in group:
            if len(group) > 1 and self.changes([(target, slabs.mask())]) is False:
                unread.append(slabs)
                continue
            if len(slabs.indices) > _SLABS_BY_VALUE:
                self.test._skip_part(
                    slabs.describe(),
                    f"{slabs.describe()}: no output depends on these {len(slabs.indices)} "
                    "indices through a gradient, but changing them changes the outputs; "
                    f"which of them are read was not worked out (more than {_SLABS_BY_VALUE})",
                )
                continue
            alone = self.unread_indices(slabs)
            if alone:
                unread.append(Slabs(target, slabs.dim, alone))
        return unread

    def unread_indices(self, slabs: Slabs) -> List[int]:
        """The indices of ``slabs`` (along a dimension) that change no output, each changed
        alone (its seeds until it is read noted: ``read_after``)."""
        target, dim = slabs.target, slabs.dim
        return [
            index
            for index in slabs.indices
            if self.changes([(target, Slabs(target, dim, [index]).mask())], alone=True) is False
        ]
