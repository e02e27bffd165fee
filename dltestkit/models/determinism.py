"""test_eval_deterministic: eval-mode outputs do not change with the seed, but by sampling."""

from __future__ import annotations

from typing import List

import torch

from ..core.compare import first_difference
from ..core.contract import check
from ..core.options import option
from ..core.seeds import derived_seed
from ..core.validators import is_bool
from .contract import ModelContract
from .randomness import describe_draws, watching_randomness

__all__ = ["EvalDeterminism"]

#: The seeds an eval-mode pass is compared under, at most, while the model draws random
#: numbers and its outputs stay alike.
_SEEDS_WHILE_DRAWING = 8


class EvalDeterminism(ModelContract):
    """No randomness left on at evaluation."""

    deterministic_eval: bool = option(False, is_bool, example="True")
    """Whether the model must give the same eval-mode outputs under any seed, sampling included.

    `False`: a model that samples at evaluation (`torch.randn_like`, `torch.normal`,
    `torch.multinomial`, `torch.distributions`: a VAE that samples its latent code) makes
    `test_eval_deterministic` skip, naming the operation and its line; dropout left on at evaluation
    fails either way."""

    # -- determinism, persistence, dtypes ------------------------------------------------------
    @check(reads=("model", "inputs", "deterministic_eval"))
    def test_eval_deterministic(self) -> None:
        """Check that eval-mode outputs do not change with the random seed, except by sampling.

        Catches randomness left on at evaluation: F.dropout(x, p) without
        training=self.training, a drop-path or a hand-made dropout mask that ignores
        self.training, attention dropout in eval mode, state that changes between calls.

        Two eval-mode passes under different seeds must give identical outputs (up to
        _SEEDS_WHILE_DRAWING seeds while the model draws random numbers and its outputs stay
        alike: a mask over a few samples can be drawn alike under two seeds). When they
        differ, the operations that drew random numbers tell design from bug: a dropout-like
        draw (the dropout functions, a Bernoulli mask, ``torch.rand_like(x) < p``, attention
        dropout) fails; explicit sampling (``torch.randn_like``, ``torch.normal``,
        ``torch.multinomial``, ``torch.distributions``) is a design (a VAE that samples its
        latent code) and skips naming the operation, unless ``deterministic_eval`` is True.
        """
        first = self._eval_pass()
        # A model that draws random numbers in eval mode may draw alike under two seeds (a
        # mask over a few samples: 4 samples kept with p = 0.8 are kept alike one time in
        # five): while the first pass under another seed drew, more seeds, until one gives
        # other outputs.
        drew: List[bool] = []
        for offset in range(1, _SEEDS_WHILE_DRAWING):
            with torch.no_grad():
                second = self._forward(
                    self.model, self.inputs, seed=derived_seed(self.seed, offset), drew=drew
                )
            differing = first_difference(first, second)
            if differing is not None or not drew[0]:
                break
        if differing is None:
            return
        path, largest = differing
        with torch.no_grad():
            again = self._forward(self.model, self.inputs)
        if first_difference(first, again) is not None:
            self.fail(
                f"two eval-mode passes over self.inputs give different {path}, even "
                "under the same seed: the model is not deterministic (a "
                "non-deterministic kernel, or state that changes between calls)."
            )
        lead = f"{path} changes with the random seed in eval mode (max difference {largest})"
        # Watched only now: a torch function mode makes some modules take another path
        # (nn.TransformerEncoder's fast path), whose outputs differ in the last bits.
        with torch.no_grad(), watching_randomness(self.model) as watch:
            self._forward(self.model, self.inputs)
        dropouts, sampling = watch.dropouts(), watch.sampling()
        if dropouts:
            self.fail(
                f"{lead}: the model draws a dropout mask at evaluation: "
                f"{describe_draws(dropouts)}. Dropout must be off in eval mode. Usual causes: "
                "F.dropout(x, p) without training=self.training (or use nn.Dropout), a "
                "drop-path or a mask (torch.rand_like(x) < p) applied when not self.training, "
                "F.scaled_dot_product_attention(..., dropout_p=p) when not self.training (pass "
                "dropout_p=p if self.training else 0.0). If the model is meant to drop at "
                "evaluation (Monte Carlo dropout), list test_eval_deterministic in "
                "expected_failed_checks with the reason."
            )
        if sampling and self.deterministic_eval:
            self.fail(
                f"{lead}: the model samples at evaluation ({describe_draws(sampling)}), and "
                "self.deterministic_eval is True. Return a deterministic value in eval mode "
                "(the mean: mu instead of mu + sigma * eps), or set deterministic_eval = False "
                "if the model samples by design."
            )
        seen = (
            f"the model samples at evaluation: {describe_draws(sampling)}"
            if sampling
            else "no operation dltestkit can see drew the random numbers (TorchScript code, "
            "a C++ extension)"
        )
        self.skipTest(
            f"{lead}; {seen}. Sampling is a design (a VAE that samples its latent code), "
            "not a bug; set deterministic_eval = True to make this a failure if the model "
            "must be deterministic at evaluation."
        )
