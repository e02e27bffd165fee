"""test_reference_model: the model computes what a reference implementation computes, on the
same weights and inputs, outputs and gradients, in eval and in training mode."""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.compare import dense, first_difference
from ..core.contract import check
from ..core.options import UNSET, option
from ..core.paths import named_tensors
from ..core.seeds import derived_seed, seed_torch
from .backward import compared_backward
from .copies import copy_module
from .copies import mode as set_mode
from .randomness import watching_randomness
from .reference import MODES, References

__all__ = ["ReferenceModel"]

Tensors = List[Tuple[str, torch.Tensor]]


def is_reference_model(value: Any) -> Optional[str]:
    if isinstance(value, nn.Module) or callable(value):
        return None
    return f"is a {type(value).__name__}, not an nn.Module or a function returning one"


class ReferenceModel(References):
    """The model computes what its reference implementation computes."""

    reference_model: Union[nn.Module, Callable[..., nn.Module]] = option(
        UNSET, is_reference_model, example="lambda model: EagerAttentionModel.from_model(model)"
    )
    """The implementation the model must compute the same as, a module that loads the model's state
    dict or a function of the model returning the reference with the model's weights.

    A module (or what a function without arguments returns) whose state dict has the model's names
    and shapes gets the model's weights; a function taking the model (a copy of it) returns the
    reference with its weights set, for a port whose parameters are named otherwise. E.g. the same
    transformers model with `attn_implementation="eager"` for one using SDPA, a straightforward
    block for an optimised one, the original for a port."""

    @check(
        reads=("model", "inputs", "loss_fn", "reference_model", "reference_rtol", "reference_atol")
    )
    def test_reference_model(self) -> None:
        """Check that the model computes what ``reference_model`` computes on the same weights
        and inputs: the outputs and the parameters' gradients, in eval and in training mode.

        Catches an optimised implementation that computes something else than the
        straightforward one: a fused or SDPA attention that masks, scales or drops
        differently from eager attention, a fused block that skips or reorders a step, a port
        that differs from the original.
        """
        reference = self._reference_implementation()
        model = self._copy_model()
        for mode in MODES:
            with self.subTest(mode=mode):
                self._compare_with_reference(model, reference, mode == "training")

    def _reference_implementation(self) -> nn.Module:
        given = self._get_or_skip("reference_model")
        if isinstance(given, nn.Module):
            built = copy_module(given)
        else:
            built = given(self._copy_model()) if _takes_model(given) else given()
        if built is self.model:  # the checks leave the user's model alone
            built = copy_module(built)
        if not isinstance(built, nn.Module):
            raise self._contract_error(
                "reference_model", f"gave a {type(built).__name__}, not an nn.Module"
            )
        own = self.model.state_dict()
        theirs = built.state_dict()
        same_layout = list(own) == list(theirs) and all(
            not isinstance(own[name], torch.Tensor) or own[name].shape == theirs[name].shape
            for name in own
        )
        if same_layout:
            with torch.no_grad():
                built.load_state_dict(own)
        elif isinstance(given, nn.Module) or not _takes_model(given):
            raise self._contract_error(
                "reference_model",
                f"gave a {type(built).__name__} whose state dict has other names or shapes than "
                f"the model's ({_layout_difference(own, theirs)}), so the model's weights cannot "
                "be loaded into it; give a function of the model that returns the reference with "
                "the model's weights (for a port whose parameters are named otherwise)",
            )
        return built

    def _reference_pass(
        self, model: nn.Module, training: bool, seed: int
    ) -> Tuple[Tensors, List[Tuple[str, Optional[torch.Tensor]]]]:
        """The outputs and the parameters' gradients (of the contract's loss) of one pass."""
        trainable = self._trainable(model)
        for _, parameter in trainable:
            parameter.grad = None
        # the mode held over the backward pass too: gradient checkpointing runs the forward
        # again there, reading the modes
        with torch.random.fork_rng(devices=[]), set_mode(model, training=training):
            output = self._seeded_forward(model, self.inputs, training, seed)
            loss = self._loss(output)
            if loss.requires_grad:
                seed_torch(seed)
                comparison = "test_reference_model compares the gradients in eval mode too"
                if not compared_backward(self, loss, training, comparison):
                    trainable = []
        outputs = [(path, t.detach()) for path, t in named_tensors(output)]
        return outputs, [(name, dense(p.grad)) for name, p in trainable]

    def _compare_with_reference(
        self, model: nn.Module, reference: nn.Module, training: bool
    ) -> None:
        mode = "training" if training else "eval"
        ours, our_grads = self._reference_pass(model, training, self.seed)
        theirs, their_grads = self._reference_pass(reference, training, self.seed)
        ours, theirs = self._reference_pairs(ours, theirs, mode, type(reference).__name__)
        found = self._reference_differences(ours, theirs)
        grads = dict(their_grads)
        pairs = [(name, g, grads[name]) for name, g in our_grads if name in grads]
        missing = [name for name, g, other in pairs if (g is None) != (other is None)]
        compared = [(n, g, o) for n, g, o in pairs if g is not None and o is not None]
        grad_found = self._reference_differences(
            [(name, g) for name, g, _ in compared], [(name, o) for name, _, o in compared], True
        )
        if not (found or grad_found or missing):
            if not pairs and our_grads:
                self._skip_part(
                    f"{mode} gradients",
                    f"no parameter of {type(reference).__name__} has a name of the model's, so "
                    "the gradients cannot be paired; only the outputs were compared. Return a "
                    "reference whose parameters have the model's names to compare them.",
                )
            return
        if training:
            self._skip_random_training(model, reference)
        label = type(reference).__name__
        if found:
            path, gap, (rtol, atol) = found[0]
            more = f" ({len(found)} of {len(ours)} outputs differ)" if len(ours) > 1 else ""
            self.fail(
                f"in {mode} mode, {path} differs from the reference model's ({label}){more}: "
                f"{gap.describe(rtol, atol, 'the reference model')}. Both ran on self.inputs "
                "with the same weights under the same seed. " + _advice()
            )
        if missing:
            which = missing[0]
            where = (
                "only in the model"
                if dict(our_grads)[which] is not None
                else "only in the reference"
            )
            self.fail(
                f"in {mode} mode, the outputs agree with the reference model's ({label}), but "
                f"{which} gets a gradient {where}: one of them cuts it off from the outputs "
                "(.detach(), torch.no_grad()). " + _advice()
            )
        name, gap, (rtol, atol) = grad_found[0]
        self.fail(
            f"in {mode} mode, the outputs agree with the reference model's ({label}), but the "
            f"gradient of {name} differs ({len(grad_found)} of {len(compared)} parameters' "
            f"gradients differ): {gap.describe(rtol, atol, 'the reference model')}. The "
            "backward pass computes something else: a custom autograd function, a "
            "detach() or an in-place operation on one of the paths. " + _advice()
        )

    def _reference_pairs(
        self, ours: Tensors, theirs: Tensors, mode: str, label: str
    ) -> Tuple[Tensors, Tensors]:
        """The outputs to compare: those at the same paths, else all by their order."""
        names = {name for name, _ in theirs}
        common = [(name, t) for name, t in ours if name in names]
        if common:
            by_name = dict(theirs)
            return common, [(name, by_name[name]) for name, _ in common]
        if len(ours) == len(theirs):
            return ours, theirs
        raise self._contract_error(
            "reference_model",
            f"gave a {label} whose {mode}-mode outputs cannot be paired with the model's: the "
            f"model returns {', '.join(n for n, _ in ours)}, the reference "
            f"{', '.join(n for n, _ in theirs)}; wrap the reference so that it returns the "
            "model's outputs",
        )

    def _skip_random_training(self, model: nn.Module, reference: nn.Module) -> None:
        """Skip the training part when the model draws random numbers in training: the two
        implementations may draw them in another order or shape under the same seed."""
        with torch.no_grad():
            first = self._seeded_forward(model, self.inputs, True, self.seed)
            again = self._seeded_forward(model, self.inputs, True, derived_seed(self.seed, 1))
        if first_difference(first, again) is None:
            return
        with torch.no_grad(), watching_randomness(model) as mine:
            self._seeded_forward(model, self.inputs, True, self.seed)
        with torch.no_grad(), watching_randomness(reference) as other:
            self._seeded_forward(reference, self.inputs, True, self.seed)
        self.skipTest(
            "in training mode the model draws random numbers ("
            + (_draws(mine.draws) or "operations dltestkit cannot see")
            + "), and the reference draws "
            + (_draws(other.draws) or "none dltestkit can see")
            + ": under one seed two implementations need not draw the same numbers in the same "
            "order, so their training-mode results cannot be compared; eval mode was. Set the "
            "dropout probabilities to 0 in both (e.g. attention_dropout=0.0, hidden_dropout=0.0) "
            "to compare training mode too."
        )


def _draws(draws: List[Any]) -> str:
    unique = list(dict.fromkeys(draw.describe() for draw in draws))
    return "; ".join(unique[:2]) + (f" and {len(unique) - 2} more" if len(unique) > 2 else "")


def _takes_model(given: Callable[..., Any]) -> bool:
    try:
        return bool(inspect.signature(given).parameters)
    except (TypeError, ValueError):
        return True


def _layout_difference(own: Any, theirs: Any) -> str:
    only_ours = [name for name in own if name not in theirs]
    only_theirs = [name for name in theirs if name not in own]
    if only_ours or only_theirs:
        return (
            f"only the model has {', '.join(only_ours[:3]) or 'none'}; only the reference has "
            f"{', '.join(only_theirs[:3]) or 'none'}"
        )
    return "the same names, in another order or of other shapes"


def _advice() -> str:
    return (
        "An optimised implementation must compute what its reference computes: look at what "
        "the two do differently there (masking, scaling, the order of operations, a skipped "
        "step). If the difference is rounding between two correct implementations, raise "
        "reference_rtol and reference_atol."
    )
