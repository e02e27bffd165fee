"""TrainerTests: checks for a training loop."""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
import torch
from scipy import integrate, stats

from ._base import (
    REQUIRED,
    Attribute,
    CheckMixin,
    check,
    is_callable,
    is_names,
    is_number,
    is_positive_int,
    is_str,
)
from ._random import preserved_global_state

__all__ = ["TrainerTests", "kl_reference"]


def kl_reference(mu: np.ndarray, log_sigma: np.ndarray, points: int = 4001) -> np.ndarray:
    """KL(N(mu, sigma^2) || N(0, 1)) per element, by numerical integration.

    Integrates ``p(x) (log p(x) - log q(x))`` with Simpson's rule over ``mu +- 12
    sigma`` using ``scipy.stats.norm`` densities; independent of the closed form.
    """
    mu = np.asarray(mu, dtype=np.float64)[..., None]
    sigma = np.exp(np.asarray(log_sigma, dtype=np.float64))[..., None]
    t = np.linspace(-12.0, 12.0, points)
    x = mu + sigma * t
    p = stats.norm(mu, sigma)
    integrand = p.pdf(x) * (p.logpdf(x) - stats.norm.logpdf(x))
    return integrate.simpson(integrand, x=x, axis=-1)


def _is_trainer(value: Any) -> Optional[str]:
    if callable(getattr(value, "train", None)) and callable(getattr(value, "eval", None)):
        return None
    return f"is a {type(value).__name__}, which has no train(epochs) and eval()"


def _call_arguments(call: Any) -> Tuple[Any, Any, Any]:
    """(tag, value, global_step) of a SummaryWriter.add_scalar call."""
    names = ("tag", "scalar_value", "global_step")
    values = list(call.args[:3]) + [None] * (3 - len(call.args[:3]))
    for position, name in enumerate(names):
        if name in call.kwargs:
            values[position] = call.kwargs[name]
    return values[0], values[1], values[2]


def _is_finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class TrainerTests(CheckMixin):
    """Checks for a trainer.

    For the overfit check the trainer built in setUp should train and evaluate on the
    same single small batch (e.g. 4 fixed, un-augmented training samples).
    """

    _mixin_name: ClassVar[str] = "TrainerTests"
    _contract: ClassVar[Tuple[Attribute, ...]] = (
        Attribute("trainer", "the trainer: train(epochs), eval() -> float and a SummaryWriter",
                  "Trainer(model, ...)", default=REQUIRED, validate=_is_trainer),
        Attribute("expected_scalars", "the scalar tags one epoch of training must log",
                  '["train/loss", "test/loss"]', validate=is_names, read_by=("test_logging",)),
        Attribute("kl_divergence", "a function (log_sigma, mu) -> KL divergence to N(0, I)",
                  "self.trainer.kl_divergence", validate=is_callable,
                  read_by=("test_kl_divergence",),
                  details="Summed over the latent dimension: one value per sample, or the "
                          "total."),
        Attribute("overfit_epochs", "the epochs trained on the single batch", "200",
                  default=100, validate=is_positive_int, read_by=("test_overfit_one_batch",)),
        Attribute("overfit_max_loss", "the eval() loss the trainer must reach after "
                  "overfit_epochs on the single batch", "30.0", validate=is_number,
                  read_by=("test_overfit_one_batch",)),
        Attribute("writer_attribute", "the name of the trainer's SummaryWriter attribute",
                  '"writer"', default="summary", validate=is_str,
                  read_by=("test_logging", "test_overfit_one_batch")),
        Attribute("kl_rtol", "the relative tolerance of the KL check", "1e-3", default=1e-4,
                  validate=is_number, read_by=("test_kl_divergence",)),
        Attribute("kl_atol", "the absolute tolerance of the KL check", "1e-4", default=1e-5,
                  validate=is_number, read_by=("test_kl_divergence",)),
    )

    trainer: Any
    expected_scalars: Sequence[str]
    kl_divergence: Callable[..., Any]
    overfit_epochs: int
    overfit_max_loss: float
    writer_attribute: str
    kl_rtol: float
    kl_atol: float

    def _prepare(self) -> None:
        """Close the trainer's writer after every check, so no event file stays open."""
        close = getattr(getattr(self.trainer, self.writer_attribute, None), "close", None)
        if callable(close):
            self.addCleanup(close)

    def _writer(self) -> Any:
        writer = getattr(self.trainer, self.writer_attribute, None)
        if writer is None or not callable(getattr(writer, "add_scalar", None)):
            self.fail(
                f"self.trainer.{self.writer_attribute} is not a SummaryWriter (it has no "
                "add_scalar); give the trainer its writer there or set self.writer_attribute"
            )
        return writer

    # -- the checks --------------------------------------------------------------
    @check
    def test_kl_divergence(self) -> None:
        """Check that ``kl_divergence`` matches a numerical reference of KL(N(mu, sigma²) ‖ N(0, 1)).

        Catches a wrong KL divergence, with the likely mistake named (a missing 0.5, the
        mean instead of the sum, log-variance for log-sigma, swapped arguments).
        """
        kl_divergence: Callable[..., Any] = self._get_or_skip("kl_divergence")
        generator = torch.Generator().manual_seed(self.seed)
        cases: List[Tuple[str, torch.Tensor, torch.Tensor]] = [
            ("mu=0, sigma=1", torch.zeros(3, 5), torch.zeros(3, 5))]
        for draw in range(4):
            mu = 2 * torch.randn(3, 5, generator=generator)
            log_sigma = 3 * torch.rand(3, 5, generator=generator) - 1.5
            cases.append((f"random draw {draw}", mu, log_sigma))
        for label, mu, log_sigma in cases:
            with self.subTest(case=label):
                reference = kl_reference(mu.numpy(), log_sigma.numpy())
                with preserved_global_state():
                    result = kl_divergence(log_sigma.clone(), mu.clone())
                result = torch.as_tensor(result).detach().double().cpu()
                if result.dim() == 0:
                    expected = torch.tensor(reference.sum())
                elif tuple(result.shape) == (mu.shape[0],):
                    expected = torch.from_numpy(reference.sum(axis=1))
                else:
                    self.fail(f"kl_divergence returned shape {tuple(result.shape)} for a batch "
                              f"of {tuple(mu.shape)}; return one value per sample "
                              f"({mu.shape[0]},) or the total (a scalar)")
                torch.testing.assert_close(
                    result, expected, rtol=self.kl_rtol, atol=self.kl_atol,
                    msg=lambda m: self._kl_message(m, label, result, mu, log_sigma))

    @staticmethod
    def _kl_message(default: str, label: str, result: torch.Tensor, mu: torch.Tensor,
                    log_sigma: torch.Tensor) -> str:
        mu64, log_sigma64 = mu.double(), log_sigma.double()
        elementwise = 0.5 * (torch.exp(2 * log_sigma64) + mu64**2 - 1) - log_sigma64
        as_log_var = 0.5 * (torch.exp(log_sigma64) + mu64**2 - 1 - log_sigma64)
        mistakes = {
            "the factor 0.5 is missing": 2 * elementwise,
            "it takes the mean over the latent dimension instead of the sum":
                elementwise / elementwise.shape[1],
            "log_sigma is treated as log-variance": as_log_var,
            "it uses sigma (exp(log_sigma)) where sigma^2 (exp(2 * log_sigma)) belongs":
                0.5 * (torch.exp(log_sigma64) + mu64**2 - 1) - log_sigma64,
            "the arguments are swapped (it expects (log_sigma, mu))":
                0.5 * (torch.exp(2 * mu64) + log_sigma64**2 - 1) - mu64,
        }
        reduce = (lambda t: t.sum()) if result.dim() == 0 else (lambda t: t.sum(dim=1))
        diagnosis = [text for text, value in mistakes.items()
                     if torch.allclose(result, reduce(value), rtol=1e-3, atol=1e-4)]
        hint = (f"It looks like {diagnosis[0]}. " if diagnosis else "")
        return (f"kl_divergence(log_sigma, mu) does not match the numerical reference of "
                f"KL(N(mu, sigma^2) || N(0, 1)) summed over the latent dimension ({label}). "
                f"{hint}The closed form is 0.5 * (sigma^2 + mu^2 - 1) - log_sigma per "
                f"dimension.\n{default}")

    @check
    def test_logging(self) -> None:
        """Check that one epoch of training logs every ``expected_scalars`` tag at step 0 with a finite value.

        Catches missing, misspelled or misplaced TensorBoard scalars, and scalars that are
        not finite numbers.
        """
        expected: Sequence[str] = self._get_or_skip("expected_scalars")
        writer = self._writer()
        with mock.patch.object(writer, "add_scalar") as add_scalar:
            self.trainer.train(1)
        logged: Dict[str, List[Tuple[Any, Any]]] = {}
        for call in add_scalar.call_args_list:
            tag, value, step = _call_arguments(call)
            logged.setdefault(tag, []).append((step, value))
        problems = []
        for tag in expected:
            if tag not in logged:
                close = difflib.get_close_matches(tag, list(logged), n=1)
                problems.append(f"{tag!r} was not logged"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
                continue
            at_zero = [value for step, value in logged[tag] if step == 0]
            if not at_zero:
                steps = [step for step, _ in logged[tag]][:5]
                problems.append(f"{tag!r} was logged at steps {steps}, never at global step 0 "
                                "(pass global_step, counting from 0)")
            elif not all(_is_finite_number(value) for value in at_zero):
                problems.append(f"{tag!r} was logged at step 0 with {at_zero[0]!r}, not a "
                                "finite number")
        if problems:
            self.fail(
                f"one epoch of trainer.train(1) did not log as expected through "
                f"trainer.{self.writer_attribute}.add_scalar:\n  " + "\n  ".join(problems)
                + f"\nTags logged: {sorted(logged, key=str) or 'none'}."
            )

    @check
    def test_overfit_one_batch(self) -> None:
        """Check that training on one batch drives ``eval()`` below ``overfit_max_loss``.

        Catches a training loop that cannot fit a single batch: a wrong loss sign, an
        optimizer that does not step, gradients zeroed after backward, wrong targets.
        """
        max_loss = self._get_or_skip("overfit_max_loss")
        before = float(self.trainer.eval())
        self.trainer.train(self.overfit_epochs)
        after = float(self.trainer.eval())
        if not (math.isfinite(after) and after <= max_loss):
            self.fail(
                f"the trainer did not overfit one batch: eval() loss {before:.6g} before and "
                f"{after:.6g} after {self.overfit_epochs} epochs, required <= {max_loss}. "
                "A trainer that cannot fit a single batch has a bug (loss sign, optimizer not "
                "stepping, gradients zeroed after backward, wrong targets). Make sure setUp "
                "trains and evaluates on the same single batch; raise overfit_epochs or the "
                "learning rate if the model is merely slow to fit."
            )
