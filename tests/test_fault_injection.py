"""Fault injection: SIGINT, SIGTERM and SIGKILL sent to a test process while a check runs (a
dataset scan with workers, a distributed check, a trainer check), under unittest and pytest.
Each run ends within bounded time and leaves no process, no temporary folder (the check's own,
TensorBoard's event files in it, multiprocessing's pymp-*) and no shared memory behind.

Each case runs a test module in a child Python of its own session, with TMPDIR set to a fresh
folder, waits until the check is inside the fault's reach (its workers or ranks running), sends
the signal to the test process alone (not to its children, which a terminal's Ctrl-C would
reach too), and looks at what is left."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import pytest

from dltestkit import DistributedError, run_distributed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
    import os, time, unittest
    import torch
    from torch import nn
    from torch.utils.data import Dataset, get_worker_info
    from dltestkit import DatasetTests, DistributedModelTests, TrainerTests


    def say(*what):
        with open(os.environ["FAULTS_READY"], "a") as ready:
            ready.write(" ".join(map(str, what)) + "\\n")
"""

SCAN = """
    class Blocks(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            if get_worker_info() is not None:
                say("worker", os.getpid())
                time.sleep(600)
            return torch.zeros(3), 0


    class TestScan(DatasetTests, unittest.TestCase):
        def setUp(self):
            self.splits = {"train": Blocks()}
            self.batch_size = 8
            say("folder", self.make_temp_dir())
"""
SCAN_READY = "worker"

DISTRIBUTED = """
    import torch.distributed as dist


    class HangsInTheRanks(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            if dist.is_initialized():
                say("rank", os.getpid())
                time.sleep(600)
            return self.linear(x)


    class TestDistributed(DistributedModelTests, unittest.TestCase):
        distributed_timeout = 600

        def setUp(self):
            self.model = HangsInTheRanks()
            self.inputs = torch.randn(4, 4)
            say("folder", self.make_temp_dir())
"""
DISTRIBUTED_READY = "rank"

TRAINER = """
    from torch.utils.tensorboard import SummaryWriter


    class Trainer:
        def __init__(self, log_dir):
            self.model = nn.Linear(4, 2)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
            self.summary = SummaryWriter(log_dir)

        def train(self, epochs):
            self.summary.add_scalar("train/loss", 1.0, 0)
            self.summary.flush()
            say("training", os.getpid())
            time.sleep(600)

        def eval(self):
            return 1.0


    class TestTrainer(TrainerTests, unittest.TestCase):
        overfit_max_loss = 0.1

        def setUp(self):
            folder = self.make_temp_dir()
            say("folder", folder)
            self.trainer = Trainer(str(folder))

        def test_overfit_one_batch(self):
            super().test_overfit_one_batch()
"""
TRAINER_READY = "training"


def session_processes(session: int) -> List[int]:
    """The processes of a session that are still running (not zombies)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[3]) == session:
            found.append(int(stat.parent.name))
    return found


def shared_memory_of(pids: Set[int]) -> List[str]:
    """Shared-memory files in /dev/shm that processes of ``pids`` made (torch names them
    torch_<pid>_..., multiprocessing psm_... and sem.mp-...)."""
    shm = Path("/dev/shm")
    if not shm.exists():
        return []
    return [
        entry.name
        for entry in shm.iterdir()
        if any(f"_{pid}_" in entry.name or entry.name.endswith(f"_{pid}") for pid in pids)
    ]


def _sigint_at_default() -> None:
    """In the test process started: SIGINT at its default action, which its Python turns into
    KeyboardInterrupt. A shell that runs the tests in the background leaves SIGINT ignored,
    and Python keeps an ignored SIGINT so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
class SignalsToARunningCheck(unittest.TestCase):
    def run_and_signal(
        self, body: str, ready: str, count: int, runner: str, signum: signal.Signals
    ) -> Dict[str, Any]:
        """Run the test module ``body`` under ``runner`` until ``count`` lines ``ready`` were
        said, send ``signum`` to the test process; what is left once it ended."""
        work = Path(tempfile.mkdtemp(prefix="dltestkit-faults-"))
        self.addCleanup(_remove, work)
        scripts, temp = work / "scripts", work / "tmp"
        scripts.mkdir()
        temp.mkdir()
        module = scripts / "test_faulty.py"
        module.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
        said = work / "ready.txt"
        command = (
            [sys.executable, "-m", "unittest", "test_faulty"]
            if runner == "unittest"
            else [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_faulty.py"]
        )
        environment = {
            **os.environ,
            "TMPDIR": str(temp),
            "FAULTS_READY": str(said),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        process = subprocess.Popen(
            command,
            cwd=scripts,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_sigint_at_default,
        )
        try:
            deadline = time.monotonic() + 60
            lines: List[str] = []
            while sum(line.startswith(ready) for line in lines) < count:
                self.assertIsNone(process.poll(), "the test process ended before the fault")
                self.assertLess(time.monotonic(), deadline, "the check never got going")
                time.sleep(0.1)
                lines = said.read_text().splitlines() if said.exists() else []
            time.sleep(0.3)
            sent = time.monotonic()
            os.kill(process.pid, signum)
            output, _ = process.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        pids = {process.pid} | {int(line.split()[1]) for line in lines if line.startswith(ready)}
        deadline = time.monotonic() + 5  # what watches its parent ends within a second
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = session_processes(process.pid)
        for pid in left:  # not to disturb other tests
            os.kill(pid, signal.SIGKILL)
        return {
            "returncode": process.returncode,
            "output": output.decode(errors="replace"),
            "seconds": took,
            "processes": left,
            # (torch keeps its compiler's cache there, torchinductor_<user>, on purpose)
            "files": sorted(p.name for p in temp.iterdir() if "torchinductor" not in p.name),
            "shared_memory": shared_memory_of(pids),
            "folders": [line.split(" ", 1)[1] for line in lines if line.startswith("folder")],
        }

    def assertNothingLeft(self, left: Dict[str, Any], signum: signal.Signals) -> None:
        output = left["output"]
        self.assertLess(left["seconds"], 15, output)
        self.assertEqual(left["processes"], [], output)
        self.assertEqual(left["files"], [], output)  # the check's folders, pymp-*, ...
        self.assertEqual(left["shared_memory"], [], output)
        self.assertTrue(left["folders"], output)
        if signum == signal.SIGTERM:  # it ends as SIGTERM ends a process
            self.assertEqual(left["returncode"], -signal.SIGTERM, output)
        else:
            self.assertNotEqual(left["returncode"], 0, output)

    def run_both(self, runs: List[Tuple[str, str, int, str, signal.Signals]]) -> None:
        """Run two cases at once (each mostly waits: Python starting, the signal), then
        check each."""
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            futures = [pool.submit(self.run_and_signal, *run) for run in runs]
        for (_, _, _, runner, signum), future in zip(runs, futures):
            with self.subTest(runner=runner, signal=signum.name):
                self.assertNothingLeft(future.result(), signum)

    def test_a_dataset_scan_with_workers(self) -> None:
        signals = (signal.SIGINT, signal.SIGTERM)
        self.run_both([(SCAN, SCAN_READY, 2, "unittest", signum) for signum in signals])

    def test_a_dataset_scan_whose_test_process_is_killed(self) -> None:
        # Nothing runs in a killed process: the workers, blocked in the dataset's code, see
        # that their parent is gone and end (its temporary folder stays, as no code ran).
        left = self.run_and_signal(SCAN, SCAN_READY, 2, "unittest", signal.SIGKILL)
        self.assertEqual(left["processes"], [], left["output"])

    def test_a_distributed_check(self) -> None:
        self.run_both(
            [
                (DISTRIBUTED, DISTRIBUTED_READY, 2, "pytest", signum)
                for signum in (signal.SIGINT, signal.SIGTERM)
            ]
        )

    def test_a_trainer_check_with_tensorboard_files_under_unittest_and_pytest(self) -> None:
        self.run_both(
            [
                (TRAINER, TRAINER_READY, 1, "unittest", signal.SIGTERM),
                (TRAINER, TRAINER_READY, 1, "pytest", signal.SIGINT),
            ]
        )


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# -- a rank killed while its DataLoader workers run (row 4) -------------------------------------
def loads_with_workers_then_hangs(rank: int, world_size: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(torch.arange(64.0), batch_size=8, num_workers=2)
    iterator = iter(loader)
    next(iterator)  # the workers have sent tensors (through a listener in a pymp-* folder)
    time.sleep(600)


class KilledRanks(unittest.TestCase):
    def test_a_rank_killed_with_its_workers_leaves_no_temporary_folder(self) -> None:
        folder = tempfile.mkdtemp(prefix="dltestkit-faults-")
        self.addCleanup(_remove, Path(folder))
        before = tempfile.tempdir
        tempfile.tempdir = folder  # the ranks' temporary files go here: what stays is seen
        try:
            with self.assertRaises(DistributedError):
                run_distributed(loads_with_workers_then_hangs, 2, timeout=4)
        finally:
            tempfile.tempdir = before
        self.assertEqual(sorted(os.listdir(folder)), [])


# -- a fork deadlock (row 7) ----------------------------------------------------------------------
class ForkDeadlock(unittest.TestCase):
    def test_a_lock_held_by_a_thread_of_the_caller_is_named(self) -> None:
        import threading

        lock = threading.Lock()
        holding = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with lock:
                holding.set()
                release.wait(30)

        thread = threading.Thread(target=hold, name="started-in-setUp", daemon=True)
        thread.start()
        holding.wait(5)
        try:
            with self.assertRaises(DistributedError) as caught:
                run_distributed(takes_the_lock, 2, lock, timeout=2)
        finally:
            release.set()
            thread.join()
        for rank in (0, 1):
            text = caught.exception.failures[rank]
            self.assertRegex(text, r"did not finish within 2 s: it hung at test_fault_injection")
            self.assertIn("in takes_the_lock (with lock:)", text)
            self.assertIn(
                "The ranks were forked while the calling process ran other threads "
                "(started-in-setUp",
                text,
            )
            self.assertIn("a fork deadlock", text)


def takes_the_lock(rank: int, world_size: int, lock: Any) -> int:
    with lock:
        return rank


if __name__ == "__main__":
    unittest.main()
