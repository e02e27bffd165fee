"""False alarms of pytest-torch's and dltestkit's default model checks on correct components.

pytest-torch (https://pypi.org/project/pytest-torch/) runs, for ``pytest --torch-model=SPEC``,
four default checks on a model and inputs it builds: the inference contract (eval mode, finite
outputs, determinism, batch invariance, device and dtype parity, no state change), invariance
(memory layouts; padding and masked tokens for text inputs), a checkpoint round trip and finite
gradients (``pytest_torch/zero_code_tests.py``, tolerance 1e-4). This script runs those four,
called as that file calls them, on every component of dltestkit's zoos of correct components
(tests/test_zoo.py's real models, tests/test_zoo_design.py's correct-by-design ones: a VAE that
samples, CLIP, mixtures of experts, state-space models, ...), with each component's own model
and inputs, and beside them dltestkit's default checks with the setUp the zoo gives it. Every
component is correct, so every failure is a false alarm; a check that cannot run the component
(inputs it cannot take) is counted apart.

    pip install pytest-torch            # not a dependency of dltestkit; 1.1.1 was measured
    python benchmarks/compare_pytest_torch.py                 # both zoos, seed 0 (about 2 min)
    python benchmarks/compare_pytest_torch.py --seeds 0 1 2 --json out.json
    python benchmarks/compare_pytest_torch.py --only pytest-torch --extended

Needs the dev extra (the zoos' transformers, timm, torchvision, PEFT, diffusers, Lightning).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402

PYTEST_TORCH_CHECKS = ("contract", "invariance", "checkpoint", "gradients")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # pytest-torch's reports open with a count line ("Inference contract: 5 passed, 1 failed");
    # the first failing check's lines say what failed
    failing = [line for line in lines if line.startswith("[FAIL]")]
    if failing:
        index = lines.index(failing[0])
        return " ".join(lines[index : index + 2])[:300]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _is_text(inputs: Any) -> bool:
    return isinstance(inputs, dict) and "input_ids" in inputs and "attention_mask" in inputs


def _vocab_size(model: torch.nn.Module, inputs: Any) -> Optional[int]:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    return int(inputs["input_ids"].max()) + 1 if _is_text(inputs) else None


def pytest_torch_verdicts(
    build: Callable[[], torch.nn.Module], make_inputs: Callable[[], Any], seed: int
) -> Dict[str, Tuple[str, str]]:
    """pytest-torch's four default zero-code checks on ``build()`` and ``make_inputs()``,
    called as pytest_torch/zero_code_tests.py calls them: check -> (status, first line), the
    status "pass", "fail" (an AssertionError) or "error" (another exception); "not run" for
    every check when the model does not run on the inputs in eval mode (pytest-torch's
    zero-code run refuses such a model before its checks)."""
    from pytest_torch.checkpoint import assert_checkpoint_roundtrip
    from pytest_torch.contract import check_inference_contract
    from pytest_torch.invariance import (
        assert_layout_invariant,
        assert_mask_invariant,
        assert_padding_invariant,
    )
    from pytest_torch.training import assert_gradients_finite
    from pytest_torch.utils import call_model

    # the zero-code run's own tolerance (1e-4) and loss (the sum of the floating outputs' means)
    from pytest_torch.zero_code_tests import TOLERANCE, _loss

    torch.manual_seed(seed)
    model = build().eval()
    inputs = make_inputs()
    config = getattr(model, "config", None)
    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    if isinstance(inputs, dict) and (takes_cache or hasattr(config, "use_cache")):
        # as pytest-torch's zero-code run prepares a transformers model's inputs: the cache
        # object, which it compares by identity, is not the model's answer
        inputs = {**inputs, "use_cache": False}
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    except Exception as exc:
        return {name: ("not run", first_line(exc)) for name in PYTEST_TORCH_CHECKS}

    def invariance() -> None:
        problems: List[str] = []
        checks: List[Callable[[], None]] = [
            lambda: assert_layout_invariant(model, inputs, **TOLERANCE)
        ]
        if _is_text(inputs):
            vocab = _vocab_size(model, inputs)
            checks.insert(0, lambda: assert_padding_invariant(model, inputs, **TOLERANCE))
            checks.insert(
                1, lambda: assert_mask_invariant(model, inputs, vocab_size=vocab, **TOLERANCE)
            )
        for check in checks:
            try:
                check()
            except AssertionError as exc:
                problems.append(str(exc))
        if problems:
            raise AssertionError("invariance violated: " + " | ".join(problems))

    runs: Dict[str, Callable[[], Any]] = {
        "contract": lambda: check_inference_contract(model, inputs, **TOLERANCE),
        "invariance": invariance,
        "checkpoint": lambda: assert_checkpoint_roundtrip(
            build, inputs, model=model.eval(), **TOLERANCE
        ),
        "gradients": lambda: assert_gradients_finite(copy.deepcopy(model).train(), inputs, _loss),
    }
    verdicts: Dict[str, Tuple[str, str]] = {}
    for name, run in runs.items():
        torch.manual_seed(seed)
        try:
            run()
            verdicts[name] = ("pass", "")
        except AssertionError as exc:
            verdicts[name] = ("fail", first_line(exc))
        except Exception as exc:
            verdicts[name] = ("error", first_line(exc))
        model.eval()
    return verdicts


def dltestkit_verdicts(mixin: type, attributes: Dict[str, Any], seed: int) -> Dict[str, str]:
    """dltestkit's default checks with the zoo's setUp: check -> status ("pass", "skip",
    "fail" or "error"), as unittest reports them."""
    from checkrunner import run_check
    from test_zoo_design import design_case

    from dltestkit.core.contract import checks_of

    case = design_case(mixin, attributes, seed=seed)
    verdicts: Dict[str, str] = {}
    for name in checks_of(case):
        if name.startswith("test_reference_") or name.endswith("_on_gpu"):
            continue  # a reference file, a GPU: neither is part of this comparison
        outcome = run_check(case, name)
        if outcome.failures:
            verdicts[name] = "fail"
        elif outcome.errors:
            verdicts[name] = "error"
        elif outcome.skips:
            verdicts[name] = "skip"
        else:
            verdicts[name] = "pass"
    return verdicts


def zoo(extended: bool) -> Dict[str, Tuple[type, Dict[str, Any]]]:
    from test_zoo import ZOO
    from test_zoo_design import DESIGN_ZOO, EXTENDED

    components: Dict[str, Tuple[type, Dict[str, Any]]] = {}
    for group in (ZOO, DESIGN_ZOO, EXTENDED if extended else {}):
        for label, (mixin, attributes, _) in group.items():
            components[label] = (mixin, attributes)
    return components


def run(
    seeds: Sequence[int], only: Optional[str], extended: bool, match: str = ""
) -> Dict[str, Any]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return _run(seeds, only, extended, match)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _run(seeds: Sequence[int], only: Optional[str], extended: bool, match: str) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for seed in seeds:
        for label, (mixin, attributes) in zoo(extended).items():
            if match and match.lower() not in label.lower():
                continue
            row: Dict[str, Any] = {"component": label, "seed": seed}
            build = attributes.get("make_model", attributes["model"])
            quiet = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stderr(quiet):
                warnings.simplefilter("ignore")
                if only in (None, "pytest-torch"):
                    row["pytest-torch"] = pytest_torch_verdicts(build, attributes["inputs"], seed)
                if only in (None, "dltestkit"):
                    row["dltestkit"] = dltestkit_verdicts(mixin, attributes, seed)
            rows.append(row)
            _progress(row)
    return {"rows": rows, "seconds": time.perf_counter() - started, "seeds": list(seeds)}


def _progress(row: Dict[str, Any]) -> None:
    parts = [f"[seed {row['seed']}] {row['component']}"]
    if "pytest-torch" in row:
        failed = [f"{n}: {s}" for n, (s, _) in row["pytest-torch"].items() if s != "pass"]
        parts.append("pytest-torch " + (", ".join(failed) if failed else "all pass"))
    if "dltestkit" in row:
        failed = [f"{n}: {s}" for n, s in row["dltestkit"].items() if s in ("fail", "error")]
        parts.append("dltestkit " + (", ".join(failed) if failed else "no failure"))
    print(" | ".join(parts), flush=True)


def report(result: Dict[str, Any]) -> None:
    rows = result["rows"]
    print(f"\n{len(rows)} component runs in {result['seconds']:.0f} s")
    with_pt = [row for row in rows if "pytest-torch" in row]
    if with_pt:
        ran = [r for r in with_pt if r["pytest-torch"]["contract"][0] != "not run"]
        alarmed = [
            r for r in ran if any(s in ("fail", "error") for s, _ in r["pytest-torch"].values())
        ]
        print(
            f"pytest-torch: {len(with_pt) - len(ran)} component runs its checks cannot run; "
            f"false alarms on {len(alarmed)} of the {len(ran)} they run"
        )
        per_check = Counter(
            name
            for r in ran
            for name, (status, _) in r["pytest-torch"].items()
            if status in ("fail", "error")
        )
        for name in PYTEST_TORCH_CHECKS:
            print(f"  {name}: {per_check[name]}")
        for r in alarmed:
            for name, (status, text) in r["pytest-torch"].items():
                if status in ("fail", "error"):
                    print(f"    [{r['seed']}] {r['component']} -- {name} ({status}): {text}")
    with_dl = [row for row in rows if "dltestkit" in row]
    if with_dl:
        alarmed = [
            r for r in with_dl if any(s in ("fail", "error") for s in r["dltestkit"].values())
        ]
        checks = sum(len(r["dltestkit"]) for r in with_dl)
        skips = sum(s == "skip" for r in with_dl for s in r["dltestkit"].values())
        print(
            f"dltestkit: false alarms on {len(alarmed)} of {len(with_dl)} component runs "
            f"({checks} check runs, {skips} skipped with a reason)"
        )
        for r in alarmed:
            failed = [n for n, s in r["dltestkit"].items() if s in ("fail", "error")]
            print(f"    [{r['seed']}] {r['component']} -- {', '.join(failed)}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", choices=("pytest-torch", "dltestkit"))
    parser.add_argument("--extended", action="store_true", help="the zoo's extended part too")
    parser.add_argument("--match", default="", help="only components whose label contains this")
    parser.add_argument("--json", help="write the verdicts to this file")
    arguments = parser.parse_args(argv)
    if arguments.only != "dltestkit":
        try:
            import pytest_torch  # noqa: F401
        except ImportError:
            sys.exit("pytest-torch is not installed: pip install pytest-torch")
    result = run(arguments.seeds, arguments.only, arguments.extended, arguments.match)
    report(result)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
