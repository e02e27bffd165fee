"""The peak memory of each ModelTests check, in units of the size of the model it checks.

    python benchmarks/model_memory.py                  # a 100M-parameter decoder (400 MB)
    python benchmarks/model_memory.py --layers 24      # a larger one

Each check runs alone in a fresh process (so that one check's peak is not another's): the
process imports torch, transformers and dltestkit, reads its resident memory, builds the model
(a transformers ``LlamaForCausalLM``, hidden size 768, ``--layers`` layers, a vocabulary of
32,000, float32) and runs the check on 4 x 32 token ids, as a test class whose ``setUp``
assigns the model would. The figure is the process's peak resident memory (``ru_maxrss``) less
what it held before the model was built, divided by the size of the model's parameters and
buffers: the model itself counts as 1. Needs transformers (the zoo extra) and Linux.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import List

CHECKS = [
    "test_all_parameters_updated",
    "test_batch_independence",
    "test_device_moving",
    "test_dtype_moving",
    "test_eval_deterministic",
    "test_finite_outputs_and_gradients",
    "test_output_shape",
    "test_state_dict_round_trip",
]

CHILD = r"""
import json, resource, sys, unittest, warnings
warnings.filterwarnings("ignore")
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from dltestkit import ModelTests
transformers.logging.set_verbosity_error()
check, layers = sys.argv[1], int(sys.argv[2])

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

def build():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))

before = rss()
torch.manual_seed(0)
model = build()
size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
ids = torch.randint(3, 32000, (4, 32), generator=torch.Generator().manual_seed(0))

class TestLlama(ModelTests, unittest.TestCase):
    def setUp(self):
        self.model = model
        self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.expected_output_shape = (4, 32, 32000)
        self.make_model = build

result = unittest.TestResult()
TestLlama(check).run(result)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
problems = [text for _, text in result.failures + result.errors]
print(json.dumps({"size": size, "peak": (peak - before) / size, "problems": problems,
                  "skipped": [why for _, why in result.skipped]}))
"""


def main(arguments: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument(
        "--source",
        default=str(Path(__file__).resolve().parent.parent),
        help="the folder dltestkit is imported from (default: this repository)",
    )
    options = parser.parse_args(arguments)
    root = Path(options.source)
    worst = 0.0
    for check in options.checks.split(","):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, check, str(options.layers)],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(f"{check}: the process failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        found = json.loads(done.stdout.strip().splitlines()[-1])
        if found["problems"]:
            print(f"{check}: {found['problems'][0][-1500:]}", file=sys.stderr)
            return 1
        outcome = "skip" if found["skipped"] else "ok"
        print(
            f"{check:40s} {found['peak']:5.2f} x the model ({found['size'] / 2**20:.0f} MiB)"
            f"  {outcome}"
        )
        worst = max(worst, found["peak"])
    print(f"largest: {worst:.2f} x the model's size")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
