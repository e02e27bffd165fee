"""What each ModelTests check costs, in forward+backward passes of the model it checks.

    python benchmarks/model_cost.py                          # every model, both setUps, 3 runs
    python benchmarks/model_cost.py --models resnet50 --setups once --repeats 5

The unit is one training-mode forward and backward pass of the model on its inputs (the
default loss of the checks), timed with the checks' thread setting (``num_threads``, one
thread) as the median of several passes after a warm-up. Each check's cost is its wall time
with ``setUp`` left out (the time ``setUp`` itself takes is measured and subtracted), divided
by the unit measured just before the run; the figures are medians over the runs (the total:
the median of the runs' totals), after one run that is not counted (``--warmups``): the first
run in a process also pays what PyTorch does once (the kernels it sets up for each new shape,
the modules it imports on first use). The seeded eval pass that most checks share is a row of
its own, run first: whichever check needed it first would otherwise be charged with it.

Models (needs the zoo extra: timm, transformers):

- ``resnet50``: timm's ``resnet50`` (``pretrained=False``) on 4 x 3 x 64 x 64 images;
- ``llama``: a transformers ``LlamaForCausalLM`` of 4 layers (hidden size 256, vocabulary
  2,000) on 4 x 32 token ids with an attention mask: a pass so short (about 40 ms here) that
  the checks' work that does not grow with the model's arithmetic (copying the module tree,
  the watched passes on ``meta``, PyTorch's dispatch) weighs several passes;
- ``llama-wide``: the same of 8 layers (hidden size 512, vocabulary 8,000) on 4 x 128 token
  ids, whose pass (about 0.85 s here) lets that work weigh as it does on real models.

``--setups``: ``once`` builds the model once and every ``setUp`` assigns it (the checks can
share their passes by identity); ``per-check`` builds it in every ``setUp``, as most test
classes are written (the checks share their passes only through the fingerprint of the model's
state). ``make_model`` is set, so that ``test_state_dict_round_trip`` runs (building the fresh
model it loads is part of its cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import unittest
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dltestkit import ModelTests  # noqa: E402
from dltestkit.models.contract import ModelContract  # noqa: E402

#: The row of the eval pass the checks share (computed once, by whichever check needs it first).
SHARED = "test_0_shared_eval_pass"

Spec = Tuple[Callable[[], nn.Module], Callable[[], Any], Dict[str, Any]]


def resnet50() -> nn.Module:
    import timm

    return timm.create_model("resnet50", pretrained=False)


def llama(
    layers: int = 4,
    width: int = 256,
    intermediate: int = 512,
    vocabulary: int = 2000,
    positions: int = 64,
) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocabulary,
            hidden_size=width,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=positions,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def llama_wide() -> nn.Module:
    return llama(layers=8, width=512, intermediate=1376, vocabulary=8000, positions=256)


def images() -> Any:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tokens(vocabulary: int = 2000, length: int = 32) -> Any:
    ids = torch.randint(3, vocabulary, (4, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def wide_tokens() -> Any:
    return tokens(8000, 128)


MODELS: Dict[str, Spec] = {
    "resnet50": (resnet50, images, {"expected_output_shape": (4, 1000)}),
    "llama": (llama, tokens, {"expected_output_shape": (4, 32, 2000)}),
    "llama-wide": (llama_wide, wide_tokens, {"expected_output_shape": (4, 128, 8000)}),
}


def unit(model: nn.Module, inputs: Any, repeats: int = 7) -> float:
    """Seconds of one training-mode forward and backward pass, with one thread (the checks')."""
    helper = ModelContract.__new__(ModelContract)
    helper.seed = 0
    helper.loss_fn = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            model.train()
            output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            helper._loss(output).backward()
            times.append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)
        model.eval()


class _Timed(unittest.TestResult):
    """Each check's wall time, and its outcome."""

    def __init__(self, set_up_times: Dict[str, float]) -> None:
        super().__init__()
        self.times: Dict[str, float] = {}
        self.set_up_times = set_up_times
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._started = time.perf_counter()

    def stopTest(self, test: unittest.TestCase) -> None:
        name = test._testMethodName
        self.times[name] = time.perf_counter() - self._started - self.set_up_times.get(name, 0.0)
        super().stopTest(test)


def case_for(name: str, setup: str, set_up_times: Dict[str, float]) -> type:
    build, make_inputs, attributes = MODELS[name]
    torch.manual_seed(0)
    built = build() if setup == "once" else None
    inputs = make_inputs()

    def set_up(self: Any) -> None:
        started = time.perf_counter()
        self.model = built if built is not None else build()
        self.inputs = inputs
        self.make_model = build
        for key, value in attributes.items():
            setattr(self, key, value)
        set_up_times[self._testMethodName] = time.perf_counter() - started

    def test_0_shared_eval_pass(self: Any) -> None:
        """The seeded eval pass the checks share, on a row of its own (run first), so that
        no check is charged with it for being the first to need it."""
        self._eval_pass()

    return type(
        f"Test_{name}",
        (ModelTests, unittest.TestCase),
        {"setUp": set_up, SHARED: test_0_shared_eval_pass},
    )


def main(arguments: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--setups", default="once,per-check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=1, help="runs before, not counted")
    options = parser.parse_args(arguments)
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    worst = 0.0
    for name in options.models.split(","):
        build, make_inputs, _ = MODELS[name]
        torch.manual_seed(0)
        yardstick = build()
        for setup in options.setups.split(","):
            per_check: Dict[str, List[float]] = {}
            totals: List[float] = []
            units: List[float] = []
            outcomes: Dict[str, str] = {}
            for _ in range(options.warmups):
                unittest.defaultTestLoader.loadTestsFromTestCase(case_for(name, setup, {})).run(
                    unittest.TestResult()
                )
            for _ in range(options.repeats):
                # the unit measured again before each run: the machine's speed drifts
                seconds = unit(yardstick, make_inputs())
                units.append(seconds)
                set_up_times: Dict[str, float] = {}
                case = case_for(name, setup, set_up_times)
                result = _Timed(set_up_times)
                unittest.defaultTestLoader.loadTestsFromTestCase(case).run(result)
                for test, text in result.failures + result.errors:
                    print(f"{name} {test._testMethodName}: {text}", file=sys.stderr)
                    return 1
                skipped = {test._testMethodName for test, _ in result.skipped}
                for check, spent in result.times.items():
                    per_check.setdefault(check, []).append(spent / seconds)
                    outcomes[check] = "skip" if check in skipped else "ok"
                totals.append(sum(result.times.values()) / seconds)
            print(
                f"\n{name}, model {'built once' if setup == 'once' else 'built per check'} "
                f"(unit: one forward+backward, median {statistics.median(units) * 1000:.0f} ms; "
                f"medians of {options.repeats} runs)"
            )
            for check, values in per_check.items():
                label = "(the eval pass the checks share)" if check == SHARED else check
                print(f"  {label:40s} {statistics.median(values):6.2f}  {outcomes[check]}")
            total = statistics.median(totals)
            runs = ", ".join(f"{value:.2f}" for value in totals)
            print(f"  {'total':40s} {total:6.2f}  (runs: {runs})")
            worst = max(worst, total)
    print(f"\nlargest total: {worst:.2f} forward+backward passes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
