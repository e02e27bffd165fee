"""test_eval_leaves_model_unchanged: eval() changes nothing it evaluates, nor the training
that follows it."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Set, Tuple
from unittest import mock

import torch
from torch import nn

from ..core.contract import check
from ..core.messages import by_count, listed
from ..core.options import option
from ..core.seeds import make_deterministic, preserved_global_state
from ..core.validators import is_bool
from .logs import same_number
from .setup import SetUpTrainer
from .state import difference

__all__ = ["EvalLeavesModelUnchanged"]

#: Layers whose forward pass depends on the train/eval mode (named first in messages).
_MODE_DEPENDENT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


class EvalLeavesModelUnchanged(SetUpTrainer):
    """eval() evaluates in eval mode and leaves the model as training needs it."""

    eval_restores_mode: bool = option(False, is_bool, example="True")
    """Whether eval() promises to leave every submodule in the train or eval mode it found it in.

    `True`: a mode that eval() switches fails, also when eval() ends with `model.train()` on a model
    its caller had put in eval mode (an inference script, another loop's validation). `False`: a
    mode that eval() switches fails only when the training that follows runs in another mode than it
    does without the eval() before."""

    # -- evaluation ---------------------------------------------------------------------------
    @check(
        reads=(
            "trainer",
            "model_attribute",
            "eval_restores_mode",
            "make_trainer",
            "writer_attribute",
        )
    )
    def test_eval_leaves_model_unchanged(self) -> None:
        """Check that ``eval()`` runs the model in eval mode, changes no parameter, buffer or
        grad mode, and leaves the training that follows in the mode it runs in without it.

        Catches an evaluation that changes what it evaluates or what comes after it:
        BatchNorm statistics updated with test data, dropout left on (no model.eval()), the
        training that follows run in eval mode (model.eval() never undone), gradients left
        disabled; with eval_restores_mode, also a caller's eval mode undone (model.train() at
        the end of eval()).
        """
        model = self._model(self.trainer)
        prefix = self.model_attribute
        names = {
            module: f"{prefix}.{name}" if name else prefix for name, module in model.named_modules()
        }
        before = self._state(self.trainer)
        modes = {names[module]: module.training for module in model.modules()}
        grad_mode = torch.is_grad_enabled()
        in_training_mode: List[nn.Module] = []

        def note_mode(module: nn.Module, _: Any) -> None:
            if module.training and module not in in_training_mode:
                in_training_mode.append(module)

        handles = [  # a TorchScript module takes no hooks; its state is compared
            module.register_forward_pre_hook(note_mode)
            for module in model.modules()
            if not isinstance(module, torch.jit.ScriptModule)
        ]
        try:
            loss = self._eval_loss(self.trainer)
        finally:
            for handle in handles:
                handle.remove()
        left = {module: module.training for module in model.modules()}
        problems = []
        parameters = dict(model.named_parameters())
        state = model.state_dict()
        changed = [
            f"{prefix}.{name} ({'parameter' if name in parameters else 'buffer'})"
            for name, value in before.items()
            if difference(value, state.get(name))
        ]
        if changed:
            problems.append(
                f"it changed {listed(changed)}: an evaluation in training mode updates "
                "BatchNorm's running statistics with the evaluation data, and an optimizer "
                "step or an in-place update in eval() changes the weights. Evaluate under "
                "model.eval() and torch.no_grad(), without stepping the optimizer"
            )
        if torch.is_grad_enabled() != grad_mode:
            problems.append(
                f"it left torch.is_grad_enabled() {torch.is_grad_enabled()}, which was "
                f"{grad_mode} before: torch.set_grad_enabled(False) without restoring it "
                "makes the training that follows compute no gradients. Evaluate inside "
                "`with torch.no_grad():` (or torch.inference_mode()) instead"
            )
            torch.set_grad_enabled(grad_mode)  # for the training observed below
        if in_training_mode:
            # Only a problem when it shows: a model of Linear layers evaluates the same in
            # either mode; dropout (a result that changes with the seed) and BatchNorm (its
            # statistics change) do not.
            with preserved_global_state():
                make_deterministic(self._other_seed())
                again = self._eval_loss(self.trainer)
            for module, training in left.items():  # as the first eval() left them
                module.training = training
            if changed or not same_number(loss, again, 0.0, 0.0):
                in_training_mode.sort(key=lambda m: not isinstance(m, _MODE_DEPENDENT))
                culprits = [f"{names[m]} ({type(m).__name__})" for m in in_training_mode]
                problems.insert(
                    0,
                    (
                        f"it ran {listed(culprits)} in training mode"
                        + (
                            f", so its loss changes with the random seed ({loss:.6g}, then "
                            f"{again:.6g})"
                            if loss != again
                            else ""
                        )
                        + ": in training mode dropout and sampling stay on, and BatchNorm "
                        "normalises with (and updates) batch statistics. Call model.eval() before "
                        "evaluating, and restore the previous mode afterwards"
                    ),
                )
        switched = [
            names[module] for module, training in left.items() if training != modes[names[module]]
        ]
        unobserved = None
        if self.eval_restores_mode:
            problems.extend(self._modes_switched(switched, modes))
            problems.extend(self._eval_mode_kept(model, names))
        elif switched:
            found, unobserved = self._training_after_eval(model, names, modes, switched)
            problems.extend(found)
        if problems:
            self.fail(
                "trainer.eval() does not leave the model as it found it:\n  - "
                + "\n  - ".join(problems)
            )
        if unobserved:
            with self.subTest(part="training after eval()"):
                self.skipTest(unobserved)

    def _modes_switched(self, switched: List[str], modes: Dict[str, bool]) -> List[str]:
        """With eval_restores_mode: every submodule whose mode eval() switched."""
        problems = []
        for was_training in (True, False):
            names = [name for name in switched if modes[name] == was_training]
            if names:
                was, now = ("training", "eval") if was_training else ("eval", "training")
                problems.append(
                    f"it left {listed(names)} in {now} mode, which "
                    f"{by_count(len(names), 'was', 'were')} in {was} mode before, although "
                    "eval_restores_mode is True (eval() promises to leave the model in the mode "
                    "it found it). Record the mode of each submodule before model.eval() and "
                    "restore it afterwards (at least was_training = model.training ... "
                    "model.train(was_training))"
                )
        return problems

    def _eval_mode_kept(self, model: nn.Module, names: Dict[nn.Module, str]) -> List[str]:
        """With eval_restores_mode: eval() once more, on the model put in eval mode first (as an
        inference script or another loop's validation calls it): every submodule must still
        be in eval mode. The modes are restored afterwards."""
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with preserved_global_state():
                make_deterministic(self.seed)
                self._eval_loss(self.trainer)
            switched = [
                names.get(module, type(module).__name__)
                for module in model.modules()
                if module.training
            ]
        finally:
            for module, training in modes.items():
                module.training = training
        if not switched:
            return []
        return [
            "called on the model in eval mode (model.eval() first, as an inference script "
            f"does), it left {listed(switched)} in training mode: an eval() that ends with "
            "model.train() undoes the caller's model.eval(), and eval_restores_mode is True. "
            "Restore the mode it found (was_training = model.training ... "
            "model.train(was_training))"
        ]

    def _training_after_eval(
        self,
        model: nn.Module,
        names: Dict[nn.Module, str],
        modes: Dict[str, bool],
        switched: List[str],
    ) -> Tuple[List[str], Optional[str]]:
        """eval() switched the mode of ``switched``: whether that shows in the training that
        follows. One epoch of training right after eval(), the mode of each module noted in
        each of its forward passes with gradients enabled, is compared with one epoch as it
        would be if eval() left the modes alone: of a fresh trainer from make_trainer() (at
        the same epoch) with the modes the model had before eval(), or, without
        make_trainer, of the same trainer with those modes restored; in it, any eval() that
        training calls itself restores the modes it found. A trainer that calls
        model.train() when training starts trains alike in both, as does one that keeps a
        submodule in eval mode on purpose and puts it back when training starts. Returns the
        problems, and why the training could not be compared when it could not."""
        after = self._training_modes(self.trainer, names)
        if self._is_set("make_trainer"):
            fresh = self._new_trainer(self.seed)
            fresh_model = self._model(fresh)
            prefix = self.model_attribute
            fresh_names = {
                module: f"{prefix}.{name}" if name else prefix
                for name, module in fresh_model.named_modules()
            }
            for module, name in fresh_names.items():
                module.training = modes.get(name, module.training)
            without = self._training_modes(fresh, fresh_names, eval_restores=True)
            how = "one epoch of a fresh trainer from make_trainer()"
        else:
            for module, name in names.items():
                module.training = modes[name]
            without = self._training_modes(self.trainer, names, eval_restores=True)
            how = "another epoch of this trainer, its modes put back as eval() found them"
        compared = [name for name in after if name in without]
        if not compared:
            return [], (
                f"eval() switched the train/eval mode of {listed(switched)} (it does not "
                "restore the mode it found); whether the training that follows runs in the "
                "wrong mode could not be seen: trainer.train(1) ran no forward pass with "
                "gradients enabled that a forward "
                "hook of the model saw. Set eval_restores_mode = True to require eval() to "
                "restore the mode it found"
            )
        modules = {name: module for module, name in names.items()}
        by_importance = sorted(
            compared, key=lambda name: not isinstance(modules.get(name), _MODE_DEPENDENT)
        )
        in_eval = [
            name
            for name in by_importance
            if (True in without[name] - after[name]) or (False in after[name] - without[name])
        ]
        in_training = [
            name
            for name in by_importance
            if name not in in_eval
            and ((False in without[name] - after[name]) or (True in after[name] - without[name]))
        ]
        problems = []
        if in_eval:
            culprits = [f"{name} ({type(modules[name]).__name__})" for name in in_eval]
            them = by_count(len(in_eval), "it", "them")
            problems.append(
                "the training that follows it runs in eval mode: trainer.train(1) right after "
                f"eval() ran {listed(culprits)} in eval mode in its forward passes with "
                "gradients, where the same training without eval()'s change of mode "
                f"({how}) runs {them} in training mode. eval() leaves {them} in eval mode and "
                f"training does not switch {them} back, so the model trains without dropout "
                "or sampling and with BatchNorm's statistics frozen. Call model.train() at the "
                "start of training (of every epoch), or restore the mode at the end of eval() "
                "(was_training = model.training ... model.train(was_training))"
            )
        if in_training:
            culprits = [f"{name} ({type(modules[name]).__name__})" for name in in_training]
            them = by_count(len(in_training), "it", "them")
            problems.append(
                "the training that follows it runs in training mode where it should not: "
                f"trainer.train(1) right after eval() ran {listed(culprits)} in training "
                "mode in its forward passes with gradients, where the same training without "
                f"eval()'s change of mode ({how}) keeps {them} in eval mode (frozen "
                f"BatchNorm statistics, say). eval() switched {them} to training mode "
                f"(model.train() at its end) and training does not switch {them} back. Restore "
                "each submodule's mode at the end of eval() (modes = {m: m.training for m in "
                "model.modules()} before model.eval(), m.train(modes[m]) after), or put the "
                "modules kept in eval mode back in it at the start of every epoch"
            )
        return problems, None

    def _training_modes(
        self, trainer: Any, names: Dict[nn.Module, str], eval_restores: bool = False
    ) -> Dict[str, Set[bool]]:
        """trainer.train(1) (logging nothing); the modes (True: training) each module of
        ``names`` had in its forward passes with gradients enabled, by name. With
        ``eval_restores``, every trainer.eval() that training calls itself puts the modules
        back in the modes it found them in."""
        members = {id(module): name for module, name in names.items()}
        seen: Dict[str, Set[bool]] = {}

        def note(module: nn.Module, _: Any) -> None:
            name = members.get(id(module))
            if name is not None and torch.is_grad_enabled():
                seen.setdefault(name, set()).add(module.training)

        evaluate = trainer.eval

        def restoring_eval(*args: Any, **kwargs: Any) -> Any:
            modes = {module: module.training for module in names}
            try:
                return evaluate(*args, **kwargs)
            finally:
                for module, training in modes.items():
                    module.training = training

        with contextlib.ExitStack() as stack:
            if eval_restores and hasattr(trainer, "__dict__"):
                stack.enter_context(mock.patch.object(trainer, "eval", restoring_eval))
            handle = nn.modules.module.register_module_forward_pre_hook(note)
            stack.callback(handle.remove)
            self._train(trainer, 1)
        return seen
