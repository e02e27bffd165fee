"""test_kl_divergence: a VAE add-on, the KL divergence against a numerical reference.

``TrainerTests`` includes it; a trainer that is no VAE leaves ``kl_divergence`` unset and it
skips.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..core.contract import CheckMixin, check
from ..core.messages import describe
from ..core.options import UNSET, ContractError, option
from ..core.seeds import preserved_global_state
from ..core.validators import is_callable, is_number
from .logs import as_number

__all__ = ["VAEChecks", "kl_reference"]

#: The argument orders test_kl_divergence knows, with the closed form of each.
KL_ARGUMENTS: Dict[Tuple[str, str], str] = {
    ("log_sigma", "mu"): "0.5 * (sigma^2 + mu^2 - 1) - log_sigma per dimension",
    ("mu", "logvar"): "-0.5 * (1 + logvar - mu^2 - exp(logvar)) per dimension",
}


def kl_reference(mu: np.ndarray, log_sigma: np.ndarray, points: int = 4001) -> np.ndarray:
    """KL(N(mu, sigma^2) || N(0, 1)) per element, by numerical integration.

    Integrates ``p(x) (log p(x) - log q(x))`` with the trapezoidal rule over ``mu +- 12
    sigma``, with ``torch.distributions.Normal`` log-densities in float64; independent of
    the closed form. The integrand is smooth and vanishes at both ends, where the rule
    converges exponentially: the result agrees with the closed form to about 1e-12.
    """
    mu_ = torch.as_tensor(np.asarray(mu, dtype=np.float64))[..., None]
    sigma = torch.as_tensor(np.asarray(log_sigma, dtype=np.float64)).exp()[..., None]
    x = mu_ + sigma * torch.linspace(-12.0, 12.0, points, dtype=torch.float64)
    log_p = torch.distributions.Normal(mu_, sigma).log_prob(x)  # type: ignore[no-untyped-call]
    log_q = torch.distributions.Normal(0.0, 1.0).log_prob(x)  # type: ignore[no-untyped-call]
    result: np.ndarray = torch.trapezoid(log_p.exp() * (log_p - log_q), x, dim=-1).numpy()
    return result


def _is_kl_arguments(value: Any) -> Optional[str]:
    if isinstance(value, (tuple, list)) and tuple(value) in KL_ARGUMENTS:
        return None
    return f"is {value!r}, not one of {', '.join(repr(names) for names in KL_ARGUMENTS)}"


class VAEChecks(CheckMixin):
    """The KL divergence of a VAE."""

    _suite: ClassVar[str] = "TrainerTests"

    kl_divergence: Callable[..., Any] = option(
        UNSET, is_callable, example="self.trainer.kl_divergence"
    )
    """The VAE's KL divergence of N(mu, sigma^2) to N(0, I), a function called with the arguments
    kl_arguments names.

    Summed over the latent dimension: one value per sample, or the total. Only for VAEs."""
    kl_arguments: Tuple[str, str] = option(
        ("log_sigma", "mu"), _is_kl_arguments, example='("mu", "logvar")'
    )
    """The arguments kl_divergence takes, in order.

    `("log_sigma", "mu")`, or `("mu", "logvar")` with logvar the log-variance, as in the
    pytorch/examples VAE: `-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`."""
    kl_rtol: float = option(1e-4, is_number, example="1e-3")
    """The relative tolerance of the KL check."""
    kl_atol: float = option(1e-5, is_number, example="1e-4")
    """The absolute tolerance of the KL check."""

    # -- VAEs -------------------------------------------------------------------------------
    @check(
        reads=("kl_divergence", "kl_arguments", "kl_rtol", "kl_atol", "trainer", "writer_attribute")
    )
    def test_kl_divergence(self) -> None:
        """Check that ``kl_divergence`` matches a numerical reference of
        KL(N(mu, sigma²) ‖ N(0, 1)).

        Catches a wrong KL divergence in a VAE, with the likely mistake named (a missing 0.5,
        the mean instead of the sum, log-variance for log-sigma, a flipped sign, swapped
        arguments, the other argument convention than kl_arguments says).
        """
        if not self._is_set("kl_divergence"):
            self.skipTest(
                f"test_kl_divergence applies to VAEs only: self.kl_divergence is not set in "
                f"{self._where()}. A VAE's test sets it (the KL divergence of the latent "
                "distribution to N(0, I), e.g. self.kl_divergence = "
                "self.trainer.kl_divergence) to enable this check"
            )
        arguments: Tuple[str, str] = (self.kl_arguments[0], self.kl_arguments[1])
        generator = torch.Generator().manual_seed(self.seed)
        cases: List[Tuple[str, torch.Tensor, torch.Tensor]] = [
            ("mu=0, sigma=1", torch.zeros(3, 5), torch.zeros(3, 5))
        ]
        for draw in range(4):
            mu = 2 * torch.randn(3, 5, generator=generator)
            log_sigma = 3 * torch.rand(3, 5, generator=generator) - 1.5
            cases.append((f"random draw {draw}", mu, log_sigma))
        results = []
        for label, mu, log_sigma in cases:  # a result that is no number is one contract error
            given = {"mu": mu, "log_sigma": log_sigma, "logvar": 2 * log_sigma}
            with preserved_global_state():
                returned = self.kl_divergence(*(given[name].clone() for name in arguments))
            results.append((label, mu, log_sigma, self._kl_result(returned, arguments)))
        for label, mu, log_sigma, result in results:
            with self.subTest(case=label):
                reference = kl_reference(mu.numpy(), log_sigma.numpy())
                if result.dim() == 0:
                    expected = torch.tensor(reference.sum())
                elif tuple(result.shape) == (mu.shape[0],):
                    expected = torch.from_numpy(reference.sum(axis=1))
                else:
                    self.fail(
                        f"kl_divergence returned shape {tuple(result.shape)} for a batch "
                        f"of {tuple(mu.shape)}; return one value per sample "
                        f"({mu.shape[0]},) or the total (a scalar)"
                    )
                message = functools.partial(
                    self._kl_message, label=label, result=result, mu=mu, log_sigma=log_sigma
                )
                torch.testing.assert_close(
                    result, expected, rtol=self.kl_rtol, atol=self.kl_atol, msg=message
                )

    def _kl_result(self, returned: Any, arguments: Tuple[str, str]) -> torch.Tensor:
        if isinstance(returned, (torch.Tensor, np.ndarray)) or as_number(returned) is not None:
            result = torch.as_tensor(returned)
            if result.is_floating_point():
                return result.detach().double().cpu()
        raise ContractError(
            f"self.kl_divergence({', '.join(arguments)}) returned {describe(returned)}, not a "
            "floating-point tensor or number; TrainerTests needs the KL divergence summed over "
            "the latent dimension: one value per sample, shape (batch,), or the total."
        )

    def _kl_message(
        self,
        default: str,
        label: str,
        result: torch.Tensor,
        mu: torch.Tensor,
        log_sigma: torch.Tensor,
    ) -> str:
        arguments: Tuple[str, str] = (self.kl_arguments[0], self.kl_arguments[1])
        mu64, log_sigma64 = mu.double(), log_sigma.double()
        elementwise = 0.5 * (torch.exp(2 * log_sigma64) + mu64**2 - 1) - log_sigma64
        common = {
            "the factor 0.5 is missing": 2 * elementwise,
            "it takes the mean over the latent dimension instead of the sum": elementwise
            / elementwise.shape[1],
            "the sign is flipped (it returns -KL)": -elementwise,
        }
        if result.dim() == 0:  # the total: a mean somewhere divides it
            batch, latent = elementwise.shape
            common = {
                **common,
                f"it averages over the batch (the total divided by the batch size, {batch}) "
                "instead of summing: return one value per sample, or their sum, and "
                "average where the loss is built": elementwise / batch,
                "it takes the mean over the batch and the latent dimension (torch.mean) "
                "instead of the sum": elementwise / (batch * latent),
            }
        if arguments == ("log_sigma", "mu"):
            mistakes = {
                # The pytorch/examples formula, called as kl(log_sigma, mu).
                "it follows the (mu, logvar) convention of the pytorch/examples VAE "
                "(-0.5 * sum(1 + logvar - mu^2 - exp(logvar))): set kl_arguments = "
                '("mu", "logvar")': -0.5 * (1 + mu64 - log_sigma64**2 - torch.exp(mu64)),
                **common,
                "log_sigma is treated as log-variance": 0.5
                * (torch.exp(log_sigma64) + mu64**2 - 1 - log_sigma64),
                "it uses sigma (exp(log_sigma)) where sigma^2 (exp(2 * log_sigma)) belongs": 0.5
                * (torch.exp(log_sigma64) + mu64**2 - 1)
                - log_sigma64,
                "the arguments are swapped (it expects (log_sigma, mu))": 0.5
                * (torch.exp(2 * mu64) + log_sigma64**2 - 1)
                - mu64,
            }
        else:
            logvar = 2 * log_sigma64
            mistakes = {
                # The (log_sigma, mu) closed form, called as kl(mu, logvar).
                "it follows the (log_sigma, mu) convention (0.5 * (sigma^2 + mu^2 - 1) - "
                'log_sigma): set kl_arguments = ("log_sigma", "mu")': 0.5
                * (torch.exp(2 * mu64) + logvar**2 - 1)
                - mu64,
                **common,
                "logvar is treated as log-sigma (it needs the log-variance)": 0.5
                * (torch.exp(2 * logvar) + mu64**2 - 1)
                - logvar,
                "the arguments are swapped (it expects (mu, logvar))": -0.5
                * (1 + mu64 - logvar**2 - torch.exp(mu64)),
            }

        def reduce(value: torch.Tensor) -> torch.Tensor:
            return value.sum() if result.dim() == 0 else value.sum(dim=1)

        diagnosis = [
            text
            for text, value in mistakes.items()
            if torch.allclose(result, reduce(value), rtol=1e-3, atol=1e-4)
        ]
        hint = f"It looks like {diagnosis[0]}. " if diagnosis else ""
        return (
            f"kl_divergence({', '.join(arguments)}) does not match the numerical reference "
            f"of KL(N(mu, sigma^2) || N(0, 1)) summed over the latent dimension ({label}). "
            f"{hint}The closed form is {KL_ARGUMENTS[arguments]}.\n{default}"
        )
