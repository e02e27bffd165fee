"""test_reference_outputs: the model computes the outputs its reference file holds, with the
weights and on the inputs stored there (a golden or snapshot test)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.compare import dense, first_difference
from ..core.contract import check
from ..core.options import UNSET, option
from ..core.paths import map_tensors, named_tensors
from ..core.references import (
    Difference,
    Reference,
    ci_refusal,
    difference,
    loss_weights,
    missing_message,
    pack,
    pack_state,
    random_streams,
    random_streams_differ,
    read,
    resolve,
    state_hash,
    test_id,
    tolerance,
    unpack_state,
    unreadable_message,
    write,
    write_command,
    write_requested,
    written_message,
)
from ..core.seeds import derived_seed, make_deterministic, preserved_global_state, seed_torch
from ..core.validators import is_bool, is_choice, is_non_negative_number, is_path, optional
from .backward import compared_backward
from .contract import ModelContract
from .copies import mode as set_mode

__all__ = ["ReferenceOutputs", "References"]

MODES = ("eval", "training")


class References(ModelContract):
    """What the comparisons with a reference (a file, another implementation) share."""

    reference_rtol: Optional[float] = option(None, optional(is_non_negative_number), example="1e-3")
    """The relative tolerance comparing with a reference file or a reference model.

    `None`: by each tensor's dtype and device, for the rounding of another torch release's, CPU's or
    implementation's kernels: 1e-4 for float32 on the CPU (1e-2 on a GPU, whose float32 convolutions
    use TF32), 1e-7 for float64, 1e-3 for float16, 1.6e-2 for bfloat16. Integers and booleans are
    compared exactly."""
    reference_atol: Optional[float] = option(None, optional(is_non_negative_number), example="1e-4")
    """The absolute tolerance comparing with a reference file or a reference model.

    `None`: by each tensor's dtype and device: 1e-5 for float32 on the CPU, 1e-7 for float64, 1e-4
    for float16, 1e-3 for bfloat16. For gradients, it grows by the relative tolerance times the
    gradient's largest magnitude (a small entry of a gradient is a sum of large terms)."""

    def _seeded_forward(
        self, model: nn.Module, inputs: Any, training: bool, seed: Optional[int] = None
    ) -> Any:
        """_forward with Python's, NumPy's and torch's generators seeded (wav2vec2 masks its
        features with NumPy's in training), restored afterwards."""
        seed = self.seed if seed is None else seed
        with preserved_global_state():
            make_deterministic(seed)
            return self._forward(model, inputs, training, seed)

    def _reference_tolerance(self, tensor: torch.Tensor) -> Tuple[float, float]:
        rtol, atol = tolerance(tensor.dtype, tensor.device)
        if not (tensor.is_floating_point() or tensor.is_complex()):
            return 0.0, 0.0
        return (
            rtol if self.reference_rtol is None else float(self.reference_rtol),
            atol if self.reference_atol is None else float(self.reference_atol),
        )

    def _reference_differences(
        self,
        actual: List[Tuple[str, torch.Tensor]],
        expected: List[Tuple[str, torch.Tensor]],
        scaled: bool = False,
    ) -> List[Tuple[str, Difference, Tuple[float, float]]]:
        """The pairs (same position in both lists) that differ, in order, with the tolerance
        each was compared with."""
        found = []
        for (path, now), (_, then) in zip(actual, expected):
            rtol, atol = self._reference_tolerance(now)
            gap = difference(now, then.to(now.device), rtol, atol, scaled=scaled)
            if gap is not None:
                found.append((path, gap, (rtol, atol)))
        return found


def _described(tensors: List[Tuple[str, torch.Tensor]]) -> str:
    shown = [f"{path} {tuple(t.shape)}" for path, t in tensors[:6]]
    more = f" and {len(tensors) - 6} more" if len(tensors) > 6 else ""
    return (", ".join(shown) + more) or "no tensor"


class ReferenceOutputs(References):
    """The model computes what its reference file holds."""

    reference_file: Union[str, "os.PathLike[str]"] = option(
        UNSET, is_path, example='"references/my_model.safetensors"'
    )
    """The reference file of test_reference_outputs, which holds the model's weights, inputs and
    outputs, written once and compared from then on.

    A relative path is taken from the folder of the test's file. Written by `python -m dltestkit
    write-references <test id>` (or any run with `DLTESTKIT_WRITE_REFERENCES=1`), never in CI; see
    [references](references.md)."""
    reference_weights: str = option("stored", is_choice("stored", "drawn"), example='"drawn"')
    """How the reference file holds the weights the outputs are computed with.

    `"stored"`: the model's state dict itself, exact (the file is as large as the weights).
    `"drawn"`: the mean and standard deviation of each parameter, from which the weights are drawn
    with NumPy's legacy generator, whose numbers never change between releases (buffers such as
    BatchNorm's statistics are stored): the file stays small whatever the model's size, and the
    comparison tests the code on weights of the model's scale."""
    reference_gradients: bool = option(False, is_bool, example="True")
    """Whether the reference file also holds the parameters' gradients, which
    test_reference_outputs then compares.

    They are the gradients of `loss_fn`, or of every floating-point output weighted with fixed
    random weights, in training mode when the model draws no random numbers in training, else in
    eval mode. The file grows by the size of the trainable weights."""

    @check(
        reads=(
            "model",
            "inputs",
            "loss_fn",
            "reference_file",
            "reference_weights",
            "reference_gradients",
            "reference_rtol",
            "reference_atol",
        )
    )
    def test_reference_outputs(self) -> None:
        """Check that the model, with the weights and on the inputs of its reference file,
        computes the outputs the file holds.

        Catches any change of what the model computes, also one that keeps every shape and
        value finite: a wrong or missing activation, attention scaled wrongly, a broken
        normalisation, a residual removed, query and key swapped, wrong rotary positions, a
        refactoring or a dependency upgrade that changed the numbers.
        """
        path = resolve(self, self._get_or_skip("reference_file"))
        if write_requested():
            self._write_reference_outputs(path)
        if not path.is_file():
            self.fail(missing_message(self, path, "the model's outputs"))
        reference = self._read_reference(path)
        if self.reference_gradients and "gradients" not in reference.meta:
            self.fail(
                f"self.reference_gradients is True, but the reference {path.name} holds no "
                f"gradients (it was written without). Rewrite it: {write_command(self)}"
            )
        inputs, model, loaded = self._reference_setting(reference)
        streams = random_streams_differ(_group_dict(reference, "random"))
        for mode in MODES:
            with self.subTest(part=f"{mode} outputs"):
                self._compare_reference_mode(reference, model, inputs, mode, streams, loaded)
        if "gradients" in reference.meta:
            with self.subTest(part="gradients"):
                self._compare_reference_gradients(reference, model, inputs, streams, loaded)

    # -- writing ---------------------------------------------------------------------------
    def _write_reference_outputs(self, path: Path) -> None:
        refusal = ci_refusal(self)
        if refusal:
            self.fail(refusal)
        seed = self.seed
        meta: Dict[str, Any] = {"kind": "model outputs", "test": test_id(self), "seed": seed}
        drawn = (
            {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
            if self.reference_weights == "drawn"
            else set()
        )
        tensors = pack_state(self.model.state_dict(), meta, drawn)
        meta["state_hash"] = state_hash(self.model.state_dict())
        given = list(named_tensors(self.inputs, "self.inputs"))
        meta["input_paths"] = [name for name, _ in given]
        tensors.update(pack("inputs", [t for _, t in given], meta))
        # the model as a later run will set it up: the reference's weights, inputs and seed
        inputs, model, _ = self._reference_setting(Reference(path, tensors, meta))
        meta["modes"], meta["outputs"] = {}, {}
        for mode in MODES:
            training = mode == "training"
            with torch.no_grad():
                first = self._seeded_forward(model.fresh(), inputs, training, seed)
                second = self._seeded_forward(
                    model.fresh(), inputs, training, derived_seed(seed, 1)
                )
            random = first_difference(first, second) is not None
            meta["modes"][mode] = "random" if random else "deterministic"
            if random and self._unseeded(model, inputs, mode, seed, first):
                meta["modes"][mode], meta["outputs"][mode] = "unseeded", []
                continue
            outputs = list(named_tensors(first))
            if drawn:
                self._refuse_degenerate_weights(outputs, mode)
            meta["outputs"][mode] = [name for name, _ in outputs]
            tensors.update(pack(mode, [t for _, t in outputs], meta))
        if self.reference_gradients:
            mode = "eval" if meta["modes"]["training"] != "deterministic" else "training"
            gradients = (
                []
                if meta["modes"][mode] == "unseeded"
                else self._reference_gradients(model, inputs, mode, seed)
            )
            meta["gradients"] = {"mode": mode, "names": [name for name, _ in gradients]}
            tensors.update(pack("gradients", [g for _, g in gradients], meta))
        tensors.update({f"random/{name}": t for name, t in random_streams().items()})
        size = write(path, tensors, meta)
        # what a later run will do, now: a model that changes from call to call has no reference
        written = read(path)
        inputs, fresh, loaded = self._reference_setting(written)
        for mode in MODES:
            self._compare_reference_mode(written, fresh, inputs, mode, None, loaded, True)
        if "gradients" in meta and meta["modes"][meta["gradients"]["mode"]] != "unseeded":
            self._compare_reference_gradients(written, fresh, inputs, None, loaded, True)
        self.skipTest(written_message(path, size))

    def _unseeded(self, model: "_Fresh", inputs: Any, mode: str, seed: int, first: Any) -> bool:
        """Whether the model reseeds torch's generator in ``mode`` (torch.seed(): its initial
        seed is another at the end of the forward pass) and a fresh copy run again under
        ``seed`` gives other outputs than ``first``: the model draws random numbers that the
        seed does not fix. Such a mode has no reference, which the comparison after writing
        says in a skipped part. (Outputs that differ without a reseeding are left to that
        comparison, which fails: state that changes from call to call.)"""
        copy, seeds = model.fresh(), []
        if isinstance(copy, torch.jit.ScriptModule):  # (no hooks: its seeds cannot be seen)
            return False
        handle = copy.register_forward_hook(lambda *_: seeds.append(torch.initial_seed()))
        try:
            with torch.no_grad():
                again = self._seeded_forward(copy, inputs, mode == "training", seed)
        finally:
            handle.remove()
        return seeds != [seed] and first_difference(first, again) is not None

    def _refuse_degenerate_weights(
        self, outputs: List[Tuple[str, torch.Tensor]], mode: str
    ) -> None:
        """Fail when weights drawn from each parameter's statistics make an output NaN or
        infinite that the model's own weights keep finite."""
        bad = [path for path, t in outputs if t.is_floating_point() and not t.isfinite().all()]
        if not bad:
            return
        with torch.no_grad():
            own = self._seeded_forward(self._copy_model(), self.inputs, mode == "training")
        if all(t.isfinite().all() for _, t in named_tensors(own) if t.is_floating_point()):
            self.fail(
                f"with weights drawn from each parameter's mean and standard deviation "
                f"(reference_weights = 'drawn'), {bad[0]} in {mode} mode has NaN or Inf values, "
                "which the model's own weights do not give: some parameter needs its structure "
                "(a positive scale, an orthogonal matrix). Set reference_weights = 'stored' to "
                "store the weights themselves."
            )

    # -- reading ---------------------------------------------------------------------------
    def _read_reference(self, path: Path) -> Reference:
        try:
            return read(path)
        except Exception as exc:
            self.fail(unreadable_message(self, path, exc))

    def _reference_setting(self, reference: Reference) -> Tuple[Any, "_Fresh", bool]:
        """self.inputs with the reference's input tensors, a copy of the model with the
        reference's weights, and whether those differ from self.model's own."""
        given = list(named_tensors(self.inputs, "self.inputs"))
        stored = reference.group("inputs")
        paths = reference.meta.get("input_paths", [])
        if [name for name, _ in given] != paths:
            self.fail(
                f"self.inputs is not called as when the reference {reference.path.name} was "
                f"written: its tensors are now {_described(given)}, then "
                f"{_described(list(zip(paths, stored)))}. The reference holds the inputs it was "
                "written with and runs the model on them; their arguments must stay. If the "
                f"change is intended, rewrite the reference: {write_command(self)}"
            )
        replacements = iter(stored)
        inputs = map_tensors(lambda t: next(replacements).to(t.device), self.inputs)
        model = self._copy_model()
        state = unpack_state(reference)
        own = model.state_dict()
        changed = _state_changes(own, state)
        if changed:
            self.fail(
                f"the model's state dict does not match the reference {reference.path.name}'s: "
                f"{changed}. The model's architecture changed since the reference was written "
                f"({reference.versions()}). If the change is intended, rewrite the reference: "
                f"{write_command(self)}"
            )
        loaded = state_hash(own) != reference.meta.get("state_hash")
        with torch.no_grad():
            model.load_state_dict(state, strict=False)
        return inputs, _Fresh(model), loaded

    def _compare_reference_mode(
        self,
        reference: Reference,
        model: "_Fresh",
        inputs: Any,
        mode: str,
        streams: Optional[str],
        loaded: bool,
        just_written: bool = False,
    ) -> None:
        if reference.meta["modes"][mode] == "unseeded":
            done = "was written" if just_written else "was compared"
            self._skip_part(f"{mode} outputs", _unseeded_reason(mode, done))
            return
        expected = list(zip(reference.meta["outputs"][mode], reference.group(mode)))
        random = reference.meta["modes"][mode] == "random"
        if random and streams:
            self._skip_random_reference(reference, f"{mode}-mode outputs", streams)
        seed = int(reference.meta["seed"])
        with torch.no_grad():
            output = self._seeded_forward(model.fresh(), inputs, mode == "training", seed)
        actual = list(named_tensors(output))
        self._compare_with_file(
            reference, actual, expected, f"in {mode} mode", loaded, just_written
        )

    def _compare_reference_gradients(
        self,
        reference: Reference,
        model: "_Fresh",
        inputs: Any,
        streams: Optional[str],
        loaded: bool,
        just_written: bool = False,
    ) -> None:
        described = reference.meta["gradients"]
        mode = described["mode"]
        if reference.meta["modes"][mode] == "unseeded":
            self.skipTest(_unseeded_reason(mode, "was compared"))
        if reference.meta["modes"][mode] == "random" and streams:
            self._skip_random_reference(reference, "gradients", streams)
        expected = list(zip(described["names"], reference.group("gradients")))
        actual = self._reference_gradients(model, inputs, mode, int(reference.meta["seed"]))
        self._compare_with_file(
            reference, actual, expected, f"in {mode} mode", loaded, just_written, gradients=True
        )

    def _reference_gradients(
        self, model: "_Fresh", inputs: Any, mode: str, seed: int
    ) -> List[Tuple[str, torch.Tensor]]:
        """The parameters' gradients (by name) of loss_fn, or of every floating-point output
        weighted with NumPy's legacy generator (the same numbers in every release)."""
        copy = model.fresh()
        for parameter in copy.parameters():
            parameter.grad = None
        # the mode held over the backward pass too: gradient checkpointing runs the forward
        # again there, reading the modes
        with torch.random.fork_rng(devices=[]), set_mode(copy, training=mode == "training"):
            output = self._seeded_forward(copy, inputs, mode == "training", seed)
            if self.loss_fn is not None:
                loss = self.loss_fn(output)
            else:
                floats = [t for _, t in named_tensors(output) if t.is_floating_point()]
                weights = loss_weights(floats, seed)
                loss = sum(
                    ((t * w.to(t.device)).sum() for t, w in zip(floats, weights)),
                    torch.zeros(()),
                )
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                seed_torch(seed)
                comparison = (
                    "the gradients of the reference file are taken in eval mode (the model "
                    "draws random numbers in training mode)"
                )
                if not compared_backward(self, loss, mode == "training", comparison):
                    return []
        return [
            (name, dense(p.grad).detach().clone())
            for name, p in copy.named_parameters()
            if p.grad is not None
        ]

    def _skip_random_reference(self, reference: Reference, what: str, streams: str) -> None:
        self.skipTest(
            f"the {what} depend on random numbers (dropout, sampling), and {streams} draws "
            f"other numbers under one seed here than where the reference {reference.path.name} "
            f"was written ({reference.versions()}), so they cannot be compared; the other parts "
            f"are. Rewrite the reference on this installation to compare them: "
            f"{write_command(self)}"
        )

    def _compare_with_file(
        self,
        reference: Reference,
        actual: List[Tuple[str, torch.Tensor]],
        expected: List[Tuple[str, torch.Tensor]],
        where: str,
        loaded: bool,
        just_written: bool,
        gradients: bool = False,
    ) -> None:
        what = "gradients" if gradients else "outputs"
        if [name for name, _ in actual] != [name for name, _ in expected]:
            self.fail(
                f"the model's {what} {where} are {_described(actual)}; the reference "
                f"{reference.path.name} holds {_described(expected)}. "
                + self._reference_advice(reference, loaded, just_written)
            )
        found = self._reference_differences(actual, expected, scaled=gradients)
        if not found:
            return
        path, gap, (rtol, atol) = found[0]
        name = f"the gradient of {path}" if gradients else path
        others = f" ({len(found)} of {len(actual)} {what} differ)" if len(actual) > 1 else ""
        self.fail(
            f"{name} {where} differs from the reference {reference.path.name}{others}: "
            f"{gap.describe(rtol, atol)}. "
            + self._reference_advice(reference, loaded, just_written)
        )

    def _reference_advice(self, reference: Reference, loaded: bool, just_written: bool) -> str:
        if just_written:
            return (
                "The reference was just written, and the model run again on its weights and "
                "inputs under the same seed computes something else: the model's outputs "
                "change from call to call (state that changes, a non-deterministic kernel), so "
                "no reference can be compared with it."
            )
        weights = (
            " self.model's own weights differ from the reference's (another seed, another "
            "torch release's initialisation or a changed setUp), which is no matter: the "
            "comparison runs on the reference's."
            if loaded and not reference.meta.get("drawn")
            else ""
        )
        return (
            "The model ran with the reference's weights, on its inputs and under its seed, so "
            f"its code now computes something else than when the reference was written "
            f"({reference.versions()}).{weights}{reference.rounding_hint()} If the change is "
            f"intended, rewrite the reference and commit it:\n    {write_command(self)}\nIf "
            "not, look for the change in the model's code since the reference was committed."
        )


class _Fresh:
    """A model copy that starts every pass from the same state (a pass in training mode
    updates BatchNorm's running statistics, which the next pass would use)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def fresh(self) -> nn.Module:
        with torch.no_grad():
            self.model.load_state_dict(self.state)
        return self.model


def _group_dict(reference: Reference, prefix: str) -> Dict[str, torch.Tensor]:
    start = f"{prefix}/"
    return {k[len(start) :]: v for k, v in reference.tensors.items() if k.startswith(start)}


def _state_changes(own: Dict[str, Any], stored: Dict[str, torch.Tensor]) -> str:
    """What differs between the model's state dict and the reference's: names, shapes."""
    tensors = {name: t for name, t in own.items() if isinstance(t, torch.Tensor)}
    missing = [name for name in tensors if name not in stored]
    unexpected = [name for name in stored if name not in tensors]
    reshaped = [
        f"{name} {tuple(tensors[name].shape)} (then {tuple(stored[name].shape)})"
        for name in tensors
        if name in stored and tensors[name].shape != stored[name].shape
    ]
    parts = []
    if missing:
        parts.append(f"new tensors {_names(missing)}")
    if unexpected:
        parts.append(f"tensors no longer there {_names(unexpected)}")
    if reshaped:
        parts.append(f"tensors of another shape {_names(reshaped)}")
    return "; ".join(parts)


def _names(names: List[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _unseeded_reason(mode: str, other: str) -> str:
    """Why a mode of the model has no reference: its random numbers are not fixed by a seed."""
    kept = "eval" if mode == "training" else "training"
    return (
        f"in {mode} mode two fresh copies of the model give other outputs under one seed: "
        "the model draws random numbers that the seed does not fix (torch.seed(), which "
        "reseeds from the operating system, as the reversible layers of transformers' "
        f"Reformer do in training mode; a generator seeded from the clock), so its {mode}-mode "
        f"outputs and gradients have no reference; {kept} mode {other}"
    )
