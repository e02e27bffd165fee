"""benchmarks/compare_pytest_torch.py: pytest-torch's default checks and dltestkit's on the same
correct components, judged as each library judges them.

pytest-torch is in the dev extra for this comparison only; its pytest plugin is not loaded in
this project's own runs (``-p no:pytest_torch`` in setup.cfg), so its fixtures and seeding stay
out of the library's tests. The whole comparison, over both zoos and several seeds, is the
script's own run (docs/trust.md gives its figures).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import tempfile
import unittest
from pathlib import Path
from typing import Any

from test_zoo_design import DESIGN_ZOO, MISSING

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_pytest_torch.py"
SAMPLING_VAE = "PyTorch examples/vae VAE (samples in both modes)"
PLAIN_VAE = "example project MLPVAE"


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("compare_pytest_torch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@unittest.skipIf(MISSING, f"needs {', '.join(MISSING)}: pip install -e '.[dev]'")
class ComparedWithPytestTorch(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.script = load_script()

    def test_pytest_torch_fails_the_sampling_vae_that_dltestkit_passes(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            written = Path(folder) / "verdicts.json"
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                self.script.main(["--match", "examples/vae", "--json", str(written)])
            rows = json.loads(written.read_text())["rows"]
        self.assertEqual([row["component"] for row in rows], [SAMPLING_VAE])
        theirs, ours = rows[0]["pytest-torch"], rows[0]["dltestkit"]
        self.assertEqual(theirs["contract"][0], "fail", theirs)
        self.assertIn("[FAIL] deterministic Outputs differ", theirs["contract"][1])
        self.assertEqual(theirs["gradients"], ["pass", ""])
        self.assertEqual(ours["test_eval_deterministic"], "skip")  # the sampling, named
        self.assertFalse([name for name, verdict in ours.items() if verdict in ("fail", "error")])
        text = output.getvalue()
        self.assertIn(
            "pytest-torch: 0 component runs its checks cannot run; false alarms on 1 of", text
        )
        self.assertRegex(text, r"  contract: 1\n  invariance: 1\n  checkpoint: 1\n  gradients: 0")
        self.assertIn(f"[0] {SAMPLING_VAE} -- contract (fail): [FAIL] deterministic", text)
        self.assertRegex(
            text, r"dltestkit: false alarms on 0 of 1 component runs \(\d+ check runs, \d+ skipped"
        )

    def test_a_correct_plain_model_passes_both(self) -> None:
        _, attributes, _ = DESIGN_ZOO[PLAIN_VAE]
        theirs = self.script.pytest_torch_verdicts(
            attributes["make_model"], attributes["inputs"], seed=1
        )
        self.assertEqual({status for status, _ in theirs.values()}, {"pass"}, theirs)


if __name__ == "__main__":
    unittest.main()
