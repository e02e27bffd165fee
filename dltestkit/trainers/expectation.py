"""Training with every random draw replaced by its expected value: dropout off, noise at its
mean. Two runs that split the same data differently (a whole batch, or micro-batches of it)
then compute the same function of each sample, which random draws of other shapes would not
give them: a dropout mask drawn for 4 samples is not the masks drawn for 2 and 2.

``expected_randomness()`` is a ``TorchFunctionMode`` over the whole run (the model's forward
passes and the trainer's own code, where a VAE may sample). It replaces

- the dropout functions (``F.dropout`` and its variants, ``torch.dropout``,
  ``torch.native_dropout``) by the identity, attention dropout
  (``F.scaled_dot_product_attention``'s ``dropout_p``) by none, ``F.rrelu`` by its mean slope;
- Gaussian noise (``torch.randn``, ``torch.randn_like``, ``torch.normal``, ``Tensor.normal_``)
  by its mean, uniform numbers (``torch.rand``, ``torch.rand_like``, ``Tensor.uniform_``) by
  the middle of their range, Bernoulli draws (``torch.bernoulli``, ``Tensor.bernoulli_``) by
  their probability. (``Tensor.normal_`` and ``Tensor.uniform_`` without gradients are an
  initialisation, ``torch.nn.init``'s, and are left alone.)

Other draws (``torch.multinomial``, ``torch.randint``, ...) are left as they are and noted, so
that a check can say it could not compare. The data order is left alone and not noted: both
runs draw it alike (``torch.randperm``, a draw from a generator of its own, the seed a sampler
draws with ``Tensor.random_``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F

from ..core.watch import Watch, op_name, user_code_location

__all__ = ["ExpectedRandomness", "expected_randomness"]

_DROPOUTS = frozenset(
    {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        torch.dropout,
        torch.dropout_,
        torch.feature_dropout,
        torch.feature_dropout_,
        torch.alpha_dropout,
        torch.alpha_dropout_,
        torch.feature_alpha_dropout,
        torch.feature_alpha_dropout_,
    }
)
_RRELU = frozenset({F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_})
#: Draws left alone: noted when a forward pass makes them.
_OTHER_DRAWS = frozenset(
    {
        "randint",
        "randint_like",
        "randperm",
        "random_",
        "multinomial",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "poisson",
        "binomial",
        "_standard_gamma",
        "_sample_dirichlet",
        "gumbel_softmax",
    }
)


def _without(kwargs: Dict[str, Any], *names: str) -> Dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key not in names}


def _argument(args: Tuple[Any, ...], kwargs: Dict[str, Any], position: int, name: str) -> Any:
    return args[position] if position < len(args) else kwargs.get(name)


class ExpectedRandomness(Watch):
    """Replace random draws by their expected value (see the module); note the draws that a
    forward pass makes and that are not replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.left: List[str] = []

    @staticmethod
    def _data_order(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        """Whether a draw is the data order's: a permutation, a draw from a generator of its
        own, or a seed drawn into a single number (a sampler's)."""
        if name == "randperm" or kwargs.get("generator") is not None:
            return True
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        return name == "random_" and tensor is not None and tensor.dim() == 0

    def handle(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        name = getattr(func, "__name__", "")
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is torch.native_dropout:
            x = args[0] if args else kwargs["input"]
            return x.clone(), torch.ones_like(x, dtype=torch.bool)
        if func in _RRELU:
            return func(*args[:3], **_without(kwargs, "training"), training=False)
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = args[:4] + (0.0,) + args[5:]
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
            return func(*args, **kwargs)
        if func is torch.randn:
            return torch.zeros(*args, **_without(kwargs, "generator"))
        if func is torch.rand:
            return torch.zeros(*args, **_without(kwargs, "generator")).fill_(0.5)
        if func is torch.randn_like:
            return torch.zeros_like(*args, **kwargs)
        if func is torch.rand_like:
            return torch.zeros_like(*args, **_without(kwargs, "generator")).fill_(0.5)
        if name in ("normal_", "uniform_") and not torch.is_grad_enabled():
            return func(*args, **kwargs)  # an initialisation (torch.nn.init), not noise
        if name == "normal_":
            return args[0].fill_(_argument(args, kwargs, 1, "mean") or 0.0)
        if name == "uniform_":
            low = _argument(args, kwargs, 1, "from")
            high = _argument(args, kwargs, 2, "to")
            low, high = 0.0 if low is None else low, 1.0 if high is None else high
            return args[0].fill_((low + high) / 2)
        if func is torch.normal:
            mean = _argument(args, kwargs, 0, "mean")
            std = _argument(args, kwargs, 1, "std")
            if isinstance(mean, torch.Tensor):
                spread = torch.zeros_like(std) if isinstance(std, torch.Tensor) else 0.0
                return (mean + spread).clone()
            if isinstance(std, torch.Tensor):
                return torch.full_like(std, float(mean))
            size = _argument(args, kwargs, 2, "size")
            rest = _without(kwargs, "mean", "std", "size", "generator")
            return torch.full(tuple(size), float(mean), **rest)
        if name == "bernoulli" and isinstance(args[0] if args else None, torch.Tensor):
            p = _argument(args, kwargs, 1, "p")
            return args[0].clone() if p is None else torch.full_like(args[0], float(p))
        if name == "bernoulli_":
            p = _argument(args, kwargs, 1, "p")
            p = 0.5 if p is None else p
            return args[0].copy_(p) if isinstance(p, torch.Tensor) else args[0].fill_(p)
        if name in _OTHER_DRAWS and not self._data_order(name, args, kwargs):
            self.left.append(f"{op_name(func)} at {user_code_location()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def expected_randomness() -> Iterator[ExpectedRandomness]:
    """Run with random draws replaced by their expected value (see the module)."""
    with ExpectedRandomness() as mode:
        yield mode
