"""Which operations of a forward pass draw random numbers, and of which kind.

A model whose eval-mode outputs change with the random seed is either broken (dropout left on:
``F.dropout(x, p)`` without ``training=self.training``, a drop-path that ignores
``self.training``) or random by design (a VAE that samples its latent code, a model that
samples tokens or a random mask). The two are told apart by the operation that drew the
numbers, seen with a ``TorchFunctionMode``:

- dropout-like: the dropout functions with training on (``F.dropout``, ``F.dropout2d``,
  ``F.alpha_dropout``, ``torch.dropout``, ...), attention dropout
  (``F.scaled_dot_product_attention`` with ``dropout_p > 0``), ``F.rrelu`` in training mode,
  Bernoulli masks (``torch.bernoulli``, ``Tensor.bernoulli_``: drop-path, hand-made dropout),
  and uniform numbers compared with a threshold (``torch.rand_like(x) < p``);
- sampling: every other random operation (``torch.randn_like``, ``torch.normal``,
  ``torch.multinomial``, ``Tensor.exponential_``, ``F.gumbel_softmax``, ``torch.distributions``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.watch import (
    ModuleTracker,
    TensorNotes,
    Watch,
    op_name,
    tensors_in,
    user_code_location,
    watching,
)

__all__ = ["RandomDraw", "RandomnessWatch", "describe_draws", "watching_randomness"]

# The dropout functions: (position of p, position and keyword of the training flag, its default)
_DROPOUTS: Dict[Any, Tuple[int, int, str, bool]] = {
    F.dropout: (1, 2, "training", True),
    F.dropout1d: (1, 2, "training", True),
    F.dropout2d: (1, 2, "training", True),
    F.dropout3d: (1, 2, "training", True),
    F.alpha_dropout: (1, 2, "training", False),
    F.feature_alpha_dropout: (1, 2, "training", False),
    torch.dropout: (1, 2, "train", True),
    torch.dropout_: (1, 2, "train", True),
    torch.feature_dropout: (1, 2, "train", True),
    torch.feature_dropout_: (1, 2, "train", True),
    torch.alpha_dropout: (1, 2, "train", True),
    torch.alpha_dropout_: (1, 2, "train", True),
    torch.feature_alpha_dropout: (1, 2, "train", True),
    torch.feature_alpha_dropout_: (1, 2, "train", True),
    torch.native_dropout: (1, 2, "train", True),
}
_RRELU: Dict[Any, Tuple[int, str, bool]] = {
    F.rrelu: (3, "training", False),
    F.rrelu_: (3, "training", False),
    torch.rrelu: (3, "training", False),
    torch.rrelu_: (3, "training", False),
}
# Operations that draw a Bernoulli mask: dropout by hand, drop-path (stochastic depth).
_MASKS = frozenset({"bernoulli", "bernoulli_"})
# Uniform draws: a dropout mask when compared with a threshold (torch.rand_like(x) < p).
_UNIFORM = frozenset({"rand", "rand_like", "uniform_"})
_COMPARISONS = frozenset({"lt", "le", "gt", "ge", "__lt__", "__le__", "__gt__", "__ge__"})
# Every other operation that draws from a generator.
_SAMPLING = frozenset(
    {
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "normal",
        "normal_",
        "random_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "multinomial",
        "poisson",
        "binomial",
        "_standard_gamma",
        "_sample_dirichlet",
        "gumbel_softmax",
        "trunc_normal_",
        "xavier_normal_",
        "xavier_uniform_",
        "kaiming_normal_",
        "kaiming_uniform_",
        "orthogonal_",
        "sparse_",
    }
)


def _argument(args: Tuple[Any, ...], kwargs: Dict[str, Any], position: int, name: str) -> Any:
    if position < len(args):
        return args[position]
    return kwargs.get(name, _ABSENT)


_ABSENT = object()


@dataclass(frozen=True)
class RandomDraw:
    """One operation of the forward pass that drew random numbers."""

    operation: str
    dropout: bool  # dropout-like (a mask) rather than sampling
    module: str
    location: str

    def describe(self) -> str:
        return f"{self.operation} in {self.module}, at {self.location}"


def describe_draws(draws: List[RandomDraw]) -> str:
    """The first few operations that drew random numbers, each once, for a message."""
    unique = list(dict.fromkeys(draw.describe() for draw in draws))
    if not unique:
        return "no operation dltestkit can see (TorchScript code, a C++ extension)"
    more = f" and {len(unique) - 3} more" if len(unique) > 3 else ""
    return "; ".join(unique[:3]) + more


class RandomnessWatch(Watch):
    """Note every operation that draws random numbers, in the order they run."""

    def __init__(self, modules: ModuleTracker) -> None:
        super().__init__(modules)
        self.draws: List[RandomDraw] = []
        #: the position in draws of the uniform draw that made a tensor
        self._uniform: TensorNotes[int] = TensorNotes()

    def _note(self, operation: str, dropout: bool) -> None:
        self.draws.append(
            RandomDraw(operation, dropout, self.modules.current(), user_code_location())
        )

    def _kind(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[bool]:
        """True for a dropout-like draw, False for sampling, None for no draw (yet)."""
        name = getattr(func, "__name__", "")
        if func in _DROPOUTS:
            p_at, flag_at, flag, default = _DROPOUTS[func]
            p = _argument(args, kwargs, p_at, "p")
            training = _argument(args, kwargs, flag_at, flag)
            on = default if training is _ABSENT else bool(training)
            return True if on and (p is _ABSENT or float(p) > 0) else None
        if func in _RRELU:
            flag_at, flag, default = _RRELU[func]
            training = _argument(args, kwargs, flag_at, flag)
            return True if (default if training is _ABSENT else bool(training)) else None
        if func is F.scaled_dot_product_attention:
            p = _argument(args, kwargs, 4, "dropout_p")
            return True if p is not _ABSENT and float(p) > 0 else None
        if name in _MASKS:
            return True
        if name in _SAMPLING:
            return False
        return None

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        name = getattr(func, "__name__", "")
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self._note(op_name(func), dropout=kind)
        if name in _COMPARISONS:
            for tensor in tensors_in(args):
                found = self._uniform.pop(tensor)
                if found is not None:
                    draw = self.draws[found]
                    self.draws[found] = RandomDraw(
                        f"{draw.operation} compared with a threshold (a mask)",
                        dropout=True,
                        module=draw.module,
                        location=draw.location,
                    )
        result = func(*args, **kwargs)
        if name in _UNIFORM and isinstance(result, torch.Tensor):
            self._note(op_name(func), dropout=False)
            self._uniform[result] = len(self.draws) - 1
        return result

    def sampling(self) -> List[RandomDraw]:
        return [draw for draw in self.draws if not draw.dropout]

    def dropouts(self) -> List[RandomDraw]:
        return [draw for draw in self.draws if draw.dropout]


@contextlib.contextmanager
def watching_randomness(model: nn.Module) -> Iterator[RandomnessWatch]:
    with watching(model, RandomnessWatch) as watch:
        yield watch
