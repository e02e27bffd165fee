"""test_train_matches_eval: training and eval mode compute the same outputs, where the model
does not depend on the mode by design.

Most layers compute the same function in both modes; the ones that do not, do so through a
few operations: dropout (``F.dropout`` and the others, attention dropout in
``F.scaled_dot_product_attention``, ``F.rrelu``), Bernoulli masks (drop-path, stochastic
depth) and normalisation with batch statistics (``F.batch_norm`` and ``F.instance_norm`` with
running statistics). The check runs the training-mode forward pass with those operations
computed as in eval mode (the dropout functions with training off, Bernoulli masks replaced
by their expectation, normalisation from the running statistics), so that every other
difference between the two passes is something the model's code does on ``self.training``.
Differences that a design explains (random numbers drawn in training only, a state updated
in training only: spectral normalisation's power iteration, NumPy's generator drawn from)
skip, naming what was seen.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..core.compare import mismatch, summary
from ..core.contract import check
from ..core.messages import listed
from ..core.paths import named_tensors
from ..core.seeds import TORCH_GENERATOR, generator_states, generators_drawn
from ..core.watch import ModuleTracker, op_name, user_code_location, watching
from .contract import ModelContract
from .norm_calls import NORM_DEFAULTS, NORMS, TrainingForward
from .passes import same_state
from .randomness import _ABSENT, _DROPOUTS, _RRELU, RandomDraw, RandomnessWatch, _argument

__all__ = ["ModeAgreement"]

# Attention with dropout inside: (position of dropout_p, of the training flag if any)
_ATTENTION: Dict[Any, Tuple[int, Optional[int]]] = {
    F.scaled_dot_product_attention: (4, None),
    F.multi_head_attention_forward: (10, 13),
}
# Recurrent layers, whose dropout between layers is on in training (torch._VF.lstm, ...)
_RECURRENT = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})


def _replaced(
    args: Tuple[Any, ...], kwargs: Dict[str, Any], position: int, name: str, value: Any
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``args`` and ``kwargs`` with the argument at ``position`` (or keyword ``name``) set."""
    if position < len(args):
        return (*args[:position], value, *args[position + 1 :]), kwargs
    return args, {**kwargs, name: value}


@dataclass(frozen=True)
class Neutralised:
    """An operation of the training pass that was computed as in eval mode."""

    what: str  # "dropout", "batch statistics", "a Bernoulli mask"
    operation: str
    module: str
    location: str
    exact: bool  # computed exactly as eval mode computes it

    def describe(self) -> str:
        return f"{self.operation} in {self.module}, at {self.location}"


class EvalEquivalentWatch(RandomnessWatch):
    """Run the mode-dependent operations of a training pass as eval mode runs them, noting
    each; note every other random draw (as RandomnessWatch does)."""

    def __init__(self, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.neutralised: List[Neutralised] = []

    def _neutralise(self, what: str, func: Any, exact: bool) -> None:
        self.neutralised.append(
            Neutralised(what, op_name(func), self.modules.current(), user_code_location(), exact)
        )

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if func in _DROPOUTS:
            p_at, flag_at, flag, default = _DROPOUTS[func]
            p = _argument(args, kwargs, p_at, "p")
            on = _argument(args, kwargs, flag_at, flag)
            if (default if on is _ABSENT else bool(on)) and (p is _ABSENT or float(p) > 0):
                self._neutralise("dropout", func, exact=True)
                args, kwargs = _replaced(args, kwargs, flag_at, flag, False)
                return func(*args, **kwargs)
        elif func in _RRELU:
            flag_at, flag, default = _RRELU[func]
            on = _argument(args, kwargs, flag_at, flag)
            if default if on is _ABSENT else bool(on):
                self._neutralise("dropout", func, exact=True)
                args, kwargs = _replaced(args, kwargs, flag_at, flag, False)
                return func(*args, **kwargs)
        elif func in _ATTENTION:
            p_at, training_at = _ATTENTION[func]
            p = _argument(args, kwargs, p_at, "dropout_p")
            on = True if training_at is None else _argument(args, kwargs, training_at, "training")
            if p is not _ABSENT and float(p) > 0 and on in (True, _ABSENT):
                self._neutralise("dropout", func, exact=True)
                args, kwargs = _replaced(args, kwargs, p_at, "dropout_p", 0.0)
                return func(*args, **kwargs)
        elif func in _RECURRENT and len(args) > 7:
            # (input, hx, params, has_biases, layers, dropout, train, ...), or packed:
            # (data, batch_sizes, hx, params, has_biases, layers, dropout, train, ...)
            at = 5 if isinstance(args[3], bool) else 6
            if float(args[at]) > 0 and bool(args[at + 1]):
                self._neutralise("dropout", func, exact=True)
                args, kwargs = _replaced(args, kwargs, at + 1, "train", False)
                return func(*args, **kwargs)
        elif func in NORMS:
            stats_at, stats, flag_at, flag = NORMS[func]
            on = _argument(args, kwargs, flag_at, flag)
            batch = NORM_DEFAULTS.get(func, False) if on is _ABSENT else bool(on)
            if batch and _argument(args, kwargs, stats_at, stats) not in (None, _ABSENT):
                self._neutralise("batch statistics", func, exact=True)
                args, kwargs = _replaced(args, kwargs, flag_at, flag, False)
                return func(*args, **kwargs)
        elif getattr(func, "__name__", "") in ("bernoulli", "bernoulli_") and args:
            self._neutralise("a Bernoulli mask", func, exact=False)
            return _expectation(func, args, kwargs)
        return super().handle(func, args, kwargs)


class MeanSamplingWatch(EvalEquivalentWatch):
    """EvalEquivalentWatch that also replaces Gaussian samples by their mean (a VAE's
    ``mu + sigma * torch.randn_like(mu)`` becomes ``mu``, what its eval mode returns)."""

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        name = getattr(func, "__name__", "")
        if name in _GAUSSIAN:
            self._neutralise("a Gaussian sample", func, exact=False)
            kept = {k: v for k, v in kwargs.items() if k not in ("generator", "mean", "std")}
            with torch.no_grad():
                if name == "randn":
                    return torch.zeros(*args, **kept)
                if name == "randn_like":
                    return torch.zeros_like(*args, **kept)
                if name == "normal_":
                    return args[0].fill_(float(kwargs.get("mean", args[1] if len(args) > 1 else 0)))
                mean = kwargs.get("mean", args[0] if args else 0.0)
                std = kwargs.get("std", args[1] if len(args) > 1 else 1.0)
                if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
                    mean, std = torch.as_tensor(mean), torch.as_tensor(std)
                    return (mean + torch.zeros_like(std, dtype=mean.dtype)).clone()
                return torch.full(args[2] if len(args) > 2 else kwargs["size"], float(mean))
        return super().handle(func, args, kwargs)


_GAUSSIAN = frozenset({"randn", "randn_like", "normal", "normal_"})


def _expectation(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
    """What a Bernoulli draw gives on average: its probabilities (drop-path's
    ``x.new_empty(shape).bernoulli_(keep)`` then ``.div_(keep)`` becomes exactly 1)."""
    tensor: torch.Tensor = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p")
    with torch.no_grad():
        if getattr(func, "__name__", "") == "bernoulli_":
            p = 0.5 if p is None else p
            if isinstance(p, torch.Tensor):
                return tensor.copy_(p.expand_as(tensor))
            return tensor.fill_(float(p))
        if p is None:
            return tensor.detach().clone()
        if isinstance(p, torch.Tensor):
            return p.detach().expand_as(tensor).clone().to(tensor.dtype)
        return torch.full_like(tensor, float(p))


@dataclass
class _Pass:
    """One forward pass of the check: its output, and what it changed or drew."""

    output: Any
    #: buffers the pass changed, by name
    changed: List[str] = field(default_factory=list)
    #: global generators other than torch's that the pass drew from
    generators: List[str] = field(default_factory=list)


@contextlib.contextmanager
def _observed(model: nn.Module, record: _Pass) -> Iterator[None]:
    """Note the buffers of ``model`` that the block changes, and whether it draws from
    NumPy's or Python's global generator."""
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    generators = generator_states()
    yield
    after = dict(model.named_buffers())
    record.changed = [
        name
        for name, value in before.items()
        if name.rsplit(".", 1)[-1] != "num_batches_tracked"  # counts calls; changes nothing
        and (name not in after or not _same(after[name], value))
    ]
    record.generators += [g for g in generators_drawn(generators) if g != TORCH_GENERATOR]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.detach(), b))


class _Recorder:
    """The tensors every module of a model takes and returns, call by call, in the order
    the calls end (a module's children end before it does)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: List[Tuple[str, str, List[torch.Tensor], List[torch.Tensor]]] = []
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            self._handles.append(
                module.register_forward_hook(self._hook(name, module), with_kwargs=True)
            )

    def _hook(self, name: str, module: nn.Module) -> Any:
        def hook(_: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            inputs = [t.detach().clone() for _, t in named_tensors((args, kwargs))]
            outputs = [t.detach().clone() for _, t in named_tensors(output)]
            self.calls.append((name, type(module).__name__, inputs, outputs))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _differ(first: List[torch.Tensor], second: List[torch.Tensor]) -> bool:
    if len(first) != len(second):
        return True
    return any(a.shape != b.shape or mismatch(a, b) is not None for a, b in zip(first, second))


class ModeAgreement(ModelContract):
    """Training and eval mode agree, but where the model depends on the mode by design."""

    @check(reads=("model", "inputs"))
    def test_train_matches_eval(self) -> None:
        """Check that training and eval mode give the same outputs, with dropout and batch
        statistics computed as in eval mode.

        Catches computations that depend on self.training by mistake: attention or a
        residual branch switched off in one mode, a scale or normalisation applied in
        training only, a layer skipped at evaluation; dropout, drop-path and BatchNorm are
        no false alarm.

        The training-mode pass runs on a copy with the dropout functions, attention dropout
        and ``F.rrelu`` switched off, Bernoulli masks (drop-path) replaced by their
        expectation and normalisation layers reading their running statistics, as eval mode
        computes them; its outputs must then be those of eval mode (within the dtype's
        tolerance). A difference that a design explains skips, naming it: random numbers
        drawn in training only (a Gumbel-softmax, LayerDrop), a Bernoulli mask whose
        expectation is not what eval mode computes, NumPy's or Python's generator drawn
        from, a buffer changed in training only (spectral normalisation), outputs of another
        structure (a dict of losses in training). A model that returns one tensor at
        evaluation and several in training (auxiliary logits) passes where one of those of its
        shape equals it.
        """
        # The first training step's outputs and the shared eval pass, if checks ran them
        # already: equal, and drawn without random numbers (which the two passes could draw
        # alike: dropout on in both modes), they show all this check would (batch statistics
        # and the like leave them so only where they change nothing), with no pass of its own.
        with same_state():  # (one fingerprint for both)
            forward, evaluated = self._training_forward(), self._stored_eval_pass()
        if (
            forward is not None
            and forward.draws == 0
            and evaluated is not None
            and self._compare_modes(forward.output, evaluated, skip=False) is None
        ):
            return
        copy = self._training_copy(forward)  # before the eval pass can change any state
        shared = self._eval_pass()
        trained, watch = self._eval_equivalent_training_pass(copy)
        # First against the eval pass the checks share (without gradients): outputs that
        # agree with it pass; a difference is judged on an eval pass of this check's own
        # (with gradients, as the training pass: no fast path of nn.TransformerEncoder).
        if self._compare_modes(trained.output, shared, skip=False) is None:
            return
        evaluated = self._observed_eval_pass()
        compared = self._compare_modes(trained.output, evaluated.output)
        if compared is None:
            return
        if any(not draw.dropout for draw in watch.draws):  # sampling: compare its mean too
            mean, _ = self._eval_equivalent_training_pass(
                self._training_copy(forward), MeanSamplingWatch
            )
            if self._compare_modes(mean.output, evaluated.output) is None:
                return
        path, difference = compared
        lead = (
            f"{path} differs between training and eval mode ({difference}), with dropout "
            "switched off and normalisation reading its running statistics in training mode"
        )
        designs = self._designs(watch, trained, evaluated)
        if designs:
            self.skipTest(
                f"{lead}; the model computes differently in training mode by design: "
                f"{'; '.join(designs)}. Not a bug that this check can show; to have the rest "
                "of the model compared, switch those off in the model the test builds."
            )
        self.fail(
            f"{lead}: nothing in the training pass explains it, so the model's code computes "
            "something else when self.training is True. "
            f"{self._first_differing_layer()} Look for a branch on self.training (or "
            "module.training) that changes the arithmetic: attention, a residual branch or a "
            "scale applied in one mode only, a layer skipped at evaluation. If the model "
            "computes differently in training by design (an auxiliary output, a training-only "
            "path), list test_train_matches_eval in expected_failed_checks with the reason."
        )

    # -- the passes ------------------------------------------------------------------------
    def _training_copy(self, seen: Optional[TrainingForward]) -> nn.Module:
        """A copy of self.model for a training-mode forward pass without a step: holding the
        model's own parameters, shared (no copy of the weights), where the first training
        step's forward pass (``seen``) wrote none; in full otherwise, or without it."""
        if seen is None or seen.written_parameters:
            return self._copy_model()
        return self._copy_model(given={id(p): p for p in self.model.parameters()})

    def _observed_eval_pass(self) -> _Pass:
        """The eval-mode pass over self.inputs (seeded, gradients enabled, so that the same
        kernels run as in training: no fast path of nn.TransformerEncoder)."""
        record = _Pass(None)
        with torch.enable_grad(), _observed(self.model, record):
            record.output = self._forward(self.model, self.inputs)
        return record

    def _eval_equivalent_training_pass(
        self, model: nn.Module, kind: Type[EvalEquivalentWatch] = EvalEquivalentWatch
    ) -> Tuple[_Pass, EvalEquivalentWatch]:
        """The training-mode pass over self.inputs on ``model`` (a copy), under the same seed,
        with dropout, Bernoulli masks and batch statistics computed as in eval mode (and, with
        MeanSamplingWatch, Gaussian samples replaced by their mean)."""
        record = _Pass(None)
        with torch.enable_grad(), _observed(model, record), watching(model, kind) as watch:
            record.output = self._forward(model, self.inputs, training=True)
        return record, watch

    # -- comparing ---------------------------------------------------------------------------
    def _compare_modes(
        self, trained: Any, evaluated: Any, skip: bool = True
    ) -> Optional[Tuple[str, str]]:
        """The first output that differs between the modes, and how; None if none does.
        Skips when the two passes return no output in common (without ``skip``, returns
        that as a difference)."""
        mine = dict(named_tensors(trained))
        theirs = dict(named_tensors(evaluated))
        common = [path for path in theirs if path in mine]
        # One tensor in eval mode and several in training (an auxiliary classifier's logits
        # beside the logits: torchvision's Inception v3 and GoogLeNet): a training output of
        # its shape that equals it passes; which one must is not known, so none that differs
        # is a failure.
        shaped = [
            path
            for path, tensor in mine.items()
            if not common
            and isinstance(evaluated, torch.Tensor)
            and tensor.shape == evaluated.shape
        ]
        if any(mismatch(mine[path].detach(), evaluated.detach()) is None for path in shaped):
            return None
        if not common and not skip:
            return "", "no output in common"
        if not common:
            self.skipTest(
                "the model returns other outputs in training mode ("
                f"{listed(list(mine), 4) or 'no tensor'}) than in eval mode ("
                f"{listed(list(theirs), 4) or 'no tensor'})"
                + (
                    f"; none of {listed(shaped, 4)}, of its shape, equals it, and which of them "
                    "eval mode returns is not known, so no difference is shown (a wrapper that "
                    "returns the same structure in both modes has it compared)"
                    if shaped
                    else ": nothing to compare (a model that returns its losses in training, as "
                    "torchvision's detection models do)"
                )
            )
        for path in common:
            a, b = mine[path], theirs[path]
            if a.shape != b.shape:
                return path, f"shape {tuple(a.shape)} in training, {tuple(b.shape)} in eval"
            report = mismatch(a.detach(), b.detach())
            if report is not None:
                return path, summary(report)
        return None

    def _designs(self, watch: EvalEquivalentWatch, trained: _Pass, evaluated: _Pass) -> List[str]:
        """What, seen in the training pass and not in the eval pass, makes the modes differ
        by design."""
        found: List[str] = []
        scripted = _scripted(self.model)
        if scripted:
            found.append(
                f"TorchScript modules ({listed(scripted)}), whose dropout and batch statistics "
                "dltestkit cannot see, so cannot switch off"
            )
        approximate = [n.describe() for n in watch.neutralised if not n.exact]
        if approximate:
            found.append(
                "Bernoulli masks (drop-path, hand-made dropout) replaced by their "
                f"expectation, which eval mode may not compute: {listed(_unique(approximate))}"
            )
        with torch.enable_grad(), watching(self.model, RandomnessWatch) as seen:
            self._forward(self.model, self.inputs)
        extra = list((Counter(watch.draws) - Counter(seen.draws)).elements())
        if extra:
            found.append(f"random numbers drawn in training only: {_draws(extra)}")
        missing = list((Counter(seen.draws) - Counter(watch.draws)).elements())
        if missing:  # dropout left on at evaluation is test_eval_deterministic's to report
            found.append(f"random numbers drawn in eval mode only: {_draws(missing)}")
        for generator in trained.generators:
            if generator not in evaluated.generators:
                found.append(f"{generator} drawn from in training only")
        changed = [name for name in trained.changed if name not in evaluated.changed]
        if changed:
            found.append(
                f"buffers updated by the training pass only: {listed(changed)} (spectral "
                "normalisation's power iteration, statistics kept by the model)"
            )
        return found

    def _first_differing_layer(self) -> str:
        """The first module whose output differs between the modes, in the order the calls
        end, and where the difference is made (run again with every module recorded)."""
        first, second = self._copy_model(), self._copy_model()
        recorded = []
        for model, training in ((first, False), (second, True)):
            recorder = _Recorder(model)
            try:
                with torch.enable_grad(), contextlib.ExitStack() as stack:
                    if training:
                        stack.enter_context(watching(model, EvalEquivalentWatch))
                    self._forward(model, self.inputs, training=training)
            finally:
                recorder.remove()
            recorded.append(recorder.calls)
        evaluated, trained = recorded
        seen: Counter[str] = Counter()
        calls = {}
        for name, _, inputs, outputs in trained:
            seen[name] += 1
            calls[(name, seen[name])] = (inputs, outputs)
        seen.clear()
        for name, kind, inputs, outputs in evaluated:
            seen[name] += 1
            other = calls.get((name, seen[name]))
            if other is None or not _differ(other[1], outputs):
                continue
            label = f"{name} ({kind})" if name else f"the model ({kind})"
            if not _differ(other[0], inputs):
                return (
                    f"The first layer whose output differs is {label}, with the same inputs "
                    "in both modes: the difference is made in its forward."
                )
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            owner = dict(first.named_modules()).get(parent)
            where = f"{parent} ({type(owner).__name__})" if parent else "the model's forward"
            return (
                f"The first layer whose output differs is {label}, whose inputs already "
                f"differ: the difference is made in {where}, before it calls {name}."
            )
        return ""


def _scripted(model: nn.Module) -> List[str]:
    """The names of the TorchScript modules of ``model`` (outermost ones)."""
    names: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(
            name.startswith(f"{outer}.") for outer in names
        ):
            names.append(name or type(model).__name__)
    return names


def _unique(texts: List[str]) -> List[str]:
    return list(dict.fromkeys(texts))


def _draws(draws: List[RandomDraw]) -> str:
    return listed(_unique([draw.describe() for draw in draws]))
