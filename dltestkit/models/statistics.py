"""test_running_statistics: normalisation layers with running statistics use the batch's
statistics in training mode and update their running statistics there.

The layers are found by what they do, not by their type: an eval-mode pass notes the tensors
that ``F.batch_norm`` and ``F.instance_norm`` (and ``torch.batch_norm``,
``torch.instance_norm``) normalise with, which are the running statistics eval mode reads; a
training-mode pass on a copy then shows, for each, whether it was normalised with the batch's
statistics and whether the running statistics changed. Frozen normalisation is told apart by
what makes it frozen: the layer kept in eval mode when the model is put in training mode (a
``train()`` that keeps it in eval, as detection backbones do), affine parameters that do not
train (requires_grad False, or buffers), or the layer listed in ``frozen_norm_layers``.
FrozenBatchNorm2d layers (torchvision's, timm's) compute with plain arithmetic and have no
running statistics in this sense: nothing to check.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Sequence, Tuple

import torch

from ..core.contract import check
from ..core.messages import listed
from ..core.options import option
from ..core.validators import is_names
from ..core.watch import watching
from .contract import ModelContract
from .copies import mode
from .modes import _scripted
from .norm_calls import ForwardObservation, NormCall, NormWatch, TrainingForward, buffer_names

__all__ = ["RunningStatistics"]


@dataclass
class _Statistics:
    """Running statistics that eval mode normalises with: the buffers' names and the call."""

    names: Tuple[str, ...]
    module: str  # the name of the module that owns them
    call: NormCall


class RunningStatistics(ModelContract):
    """Normalisation layers with running statistics train them."""

    frozen_norm_layers: Collection[str] = option((), is_names, example='["backbone.*"]')
    """Names or glob patterns of the normalisation layers whose running statistics are frozen by
    design.

    Layers kept in eval mode when the model is put in training mode (a `train()` that keeps them in
    eval) and layers whose affine parameters do not train (requires_grad False, or buffers) are
    frozen by design without being listed; list the others (a layer called with `momentum=0` on
    purpose)."""

    @check(reads=("model", "inputs", "unbatched_inputs", "frozen_norm_layers"))
    def test_running_statistics(self) -> None:
        """Check that normalisation layers with running statistics use the batch's statistics
        in training mode and update their running statistics there.

        Catches BatchNorm (and InstanceNorm with running statistics) whose statistics do not
        train, so that evaluation normalises with statistics that never saw the data:
        track_running_stats switched off after the layer was built, momentum=0,
        F.batch_norm(..., training=False) in training mode; frozen BatchNorm is no false
        alarm.
        """
        used = self._statistics_used_in_eval()
        if not used:
            scripted = _scripted(self.model)
            self.skipTest(
                "no normalisation in eval mode is handed running statistics (no F.batch_norm "
                "or F.instance_norm with a running_mean): nothing to check"
                + (
                    f" (the operations of TorchScript modules, {listed(scripted)}, cannot be "
                    "watched)"
                    if scripted
                    else ""
                )
            )
        forward = self._statistics_training_pass()
        calls, training, changed = forward.norm_calls, dict(forward.modes), forward.changed_buffers
        checked, frozen = [], []
        for stats in used:
            why = self._frozen_by_design(stats, training)
            if why:
                frozen.append(f"{stats.call.module} ({why})")
                continue
            checked.append(stats)
            problem = self._problem(stats, calls, changed)
            if problem:
                self.fail(
                    f"{stats.call.module} {problem}. Eval mode normalises with these running "
                    "statistics, so evaluation uses statistics that never saw the training "
                    "data. In training mode, call F.batch_norm with training=True, the running "
                    "statistics and a momentum above 0 (nn.BatchNorm does, with "
                    "track_running_stats=True). If the layer is frozen on purpose, keep it in "
                    "eval mode in the model's train(), freeze its weight and bias "
                    "(requires_grad False), or list it in self.frozen_norm_layers."
                )
        if not checked:
            self.skipTest(
                "every normalisation layer with running statistics is frozen by design: "
                f"{listed(frozen)}; nothing to check"
            )

    # -- the passes ------------------------------------------------------------------------
    def _statistics_used_in_eval(self) -> List[_Statistics]:
        """The running statistics that normalisation is handed in eval mode, from a watched
        eval-mode pass (without gradients) over one sample of self.inputs: which tensors a
        normalisation is handed does not depend on the batch."""
        names = buffer_names(self.model)

        def watched(inputs: Any) -> NormWatch:
            with torch.no_grad(), watching(self.model, lambda m: NormWatch(m, names)) as watch:
                self._forward(self.model, inputs)
            return watch

        watch = self._on_few_samples(watched)
        found: Dict[Tuple[str, ...], _Statistics] = {}
        for call in watch.calls:
            known = call.statistics
            if not known:
                continue  # not buffers of the model
            module = known[0].rsplit(".", 1)[0] if "." in known[0] else ""
            found.setdefault(known, _Statistics(known, module, call))
        return list(found.values())

    def _statistics_training_pass(self) -> TrainingForward:
        """What the training-mode pass over self.inputs of the first training step showed,
        if a check ran that step already; else a watched training-mode pass of a copy."""
        shared = self._training_forward()
        if shared is not None:
            return shared
        model = self._copy_model()
        with torch.no_grad(), mode(model, training=True):
            with ForwardObservation(model) as observation:
                output = self._forward(model, self.inputs, training=True)
        return observation.result(output)

    # -- judging -----------------------------------------------------------------------------
    def _frozen_by_design(self, stats: _Statistics, training: Dict[str, bool]) -> str:
        """Why the layer's statistics are frozen by design, or "" if they are not."""
        if any(fnmatch.fnmatchcase(stats.module, p) for p in self.frozen_norm_layers):
            return "listed in frozen_norm_layers"
        if not training.get(stats.module, True):
            return "kept in eval mode when the model is in training mode"
        if stats.call.affine_frozen:
            return "its weight and bias do not train"
        return ""

    def _problem(
        self,
        stats: _Statistics,
        calls: Sequence[NormCall],
        changed: Sequence[str],
    ) -> str:
        """What is wrong with the statistics ``stats`` in the training pass, or ""."""
        mine = [call for call in calls if set(stats.names) & set(call.statistics)]
        short = ", ".join(name.rsplit(".", 1)[-1] for name in stats.names)
        if not mine:
            unhanded = [
                call
                for call in calls
                if call.running_mean is None and call.module == stats.call.module
            ]
            if unhanded:
                return (
                    f"does not update its running statistics ({short}) in training mode: "
                    f"{unhanded[0].operation} is called without them, at "
                    f"{unhanded[0].location} (running_mean=None: track_running_stats is False "
                    "in training, for instance set to False after the layer was built)"
                )
            return (
                f"does not update its running statistics ({short}) in training mode: no "
                "normalisation of the training-mode pass is handed them (the layer is not "
                "called in training mode)"
            )
        running = [call for call in mine if not call.batch_statistics]
        if running:
            return (
                f"normalises with its running statistics ({short}) in training mode instead "
                "of the batch's statistics, and does not update them: "
                f"{running[0].operation} is called with training=False (use_input_stats=False "
                f"for instance norm) while the layer is in training mode, at {running[0].location}"
            )
        unchanged = [name.rsplit(".", 1)[-1] for name in stats.names if name not in changed]
        if unchanged:
            return (
                f"does not update its running statistics ({', '.join(unchanged)}) in training "
                f"mode: {mine[0].operation} normalises with the batch's statistics but is "
                f"called with momentum={mine[0].momentum!r}, which leaves them as they are, at "
                f"{mine[0].location}"
            )
        return ""
