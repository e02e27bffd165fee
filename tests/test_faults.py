"""Under faults and bad input (issue 26): no hang, no leftover, no changed global state, and the
right culprit named. One test per row of the issue that runs in-process; the signal and kill
tests, which run a test process of their own, are in test_fault_injection.py."""

from __future__ import annotations

import contextlib
import os
import tempfile
import unittest
import warnings
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch
from checkrunner import CheckTestCase, make_case, run_check
from torch import nn
from torch.utils.data import Dataset, IterableDataset, get_worker_info

import dltestkit.data.split
from dltestkit import (
    DatasetTests,
    DistributedError,
    DistributedModelTests,
    DistributedTrainerTests,
    ModelTests,
    SequenceModelTests,
    TrainerTests,
    run_distributed,
)


# -- components -----------------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def small_case(mixin: type = ModelTests, model: Any = Small, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.model = model()
        self.inputs = torch.randn(4, 4)
        self.expected_output_shape = (4, 3)

    return make_case(mixin, set_up, **attributes)


class ChangesGlobalSettings(Small):
    """A forward that changes every global setting a model can change, and leaves them so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.autograd.set_detect_anomaly(True)
        os.environ["DLTESTKIT_FAULTS_PROBE"] = "set by forward"
        os.chdir(tempfile.gettempdir())
        return self.linear(x)


class TurnsGradOff(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(False)
        return self.linear(x)


class NanGradient(nn.Module):
    """Finite outputs, a NaN gradient: sqrt at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.sqrt(self.linear.weight[0, 0] * 0)


class ReturnsNone(Small):
    def forward(self, x: torch.Tensor) -> None:
        self.linear(x)  # the return statement forgotten


class LongStream(IterableDataset):
    """A stream of 5,000 samples per worker that claims 50 (as an endless one would: bounded
    here so that a scan without the bound ends too); counts what it gave."""

    def __init__(self) -> None:
        self.given = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return 50

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for number in range(5000):
            self.given += 1
            yield torch.full((3,), float(number * 10 + worker)), number % 3


class Slow(Dataset):
    """Samples that take a while each."""

    def __len__(self) -> int:
        return 200

    def __getitem__(self, index: int) -> Any:
        import time

        time.sleep(0.005)
        return torch.full((3,), float(index)), index % 3


@contextlib.contextmanager
def in_a_temporary_cwd() -> Iterator[Path]:
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(before)


# -- row 1: a stream read past its length ---------------------------------------------------------
class StreamsAreReadNoFurtherThanTheirLength(CheckTestCase):
    def test_a_stream_that_overruns_its_length_is_a_bug_of_the_dataset_not_a_hang(self) -> None:
        stream = LongStream()

        def set_up(self: Any) -> None:
            self.splits = {"train": stream}

        case = make_case(DatasetTests, set_up, batch_size=16, num_classes=3)
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'train': the stream gives more samples than len() says (50): the "
            "DataLoader's 2 workers had read 64 and it had not ended, so the scan stopped there",
            "a stream that never ends has no __len__",
        )
        # read to the batch past its length, the batches in flight then (two per worker), and
        # the batch each worker may have begun when the loader shut down
        self.assertLessEqual(int(stream.given), 64 + 2 * 2 * 16 + 2 * 16)


# -- rows 5 and 8: global settings ----------------------------------------------------------------
class GlobalSettingsAreRestored(CheckTestCase):
    def test_settings_changed_by_forward_or_set_up_are_restored_after_each_check(self) -> None:
        def set_up(self: Any) -> None:
            torch.set_grad_enabled(False)
            torch.set_float32_matmul_precision("medium")
            os.environ["DLTESTKIT_FAULTS_SETUP"] = "set by setUp"
            self.model = ChangesGlobalSettings()
            self.inputs = torch.randn(4, 4)

        case = make_case(ModelTests, set_up)
        cwd = os.getcwd()
        with in_a_temporary_cwd() as folder:
            for name in ("test_output_shape", "test_eval_deterministic"):
                with self.subTest(name):
                    run_check(case, name)
                    self.assertEqual(torch.get_default_dtype(), torch.float32)
                    self.assertTrue(torch.is_grad_enabled())
                    self.assertFalse(torch.are_deterministic_algorithms_enabled())
                    self.assertFalse(torch.is_anomaly_enabled())
                    self.assertEqual(torch.get_float32_matmul_precision(), "highest")
                    self.assertNotIn("DLTESTKIT_FAULTS_PROBE", os.environ)
                    self.assertNotIn("DLTESTKIT_FAULTS_SETUP", os.environ)
                    self.assertEqual(os.getcwd(), str(folder))
        self.assertEqual(os.getcwd(), cwd)

    def test_a_failure_names_the_setting_forward_changed(self) -> None:
        text = self.assertFailsWith(
            small_case(model=TurnsGradOff),
            "test_all_parameters_updated",
            "no gradient in 3 step(s)",
            "[dltestkit] global settings changed while the check ran, which may explain this: "
            "grad mode turned off (torch.set_grad_enabled(False)), by the forward of "
            "TurnsGradOff.",
        )
        self.assertLess(text.index("global settings changed"), text.index("ran with seed="))
        self.assertTrue(torch.is_grad_enabled())

    def test_torch_noting_its_cache_folder_is_no_setting_of_the_model(self) -> None:
        # torch._dynamo's first import (which an operation of forward may make lazily) sets
        # TORCHINDUCTOR_CACHE_DIR: torch's own, neither reported nor taken back
        class FirstUseOfDynamo(TurnsGradOff):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                from torch._inductor.runtime.cache_dir_utils import cache_dir

                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                cache_dir()  # what that import does
                return super().forward(x)

        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

        def restore() -> None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            if saved is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved

        self.addCleanup(restore)
        text = self.assertFailsWith(
            small_case(model=FirstUseOfDynamo),
            "test_all_parameters_updated",
            "global settings changed while the check ran, which may explain this: grad mode "
            "turned off (torch.set_grad_enabled(False)), by the forward of FirstUseOfDynamo.",
        )
        self.assertNotIn("TORCHINDUCTOR_CACHE_DIR", text)
        self.assertIn("TORCHINDUCTOR_CACHE_DIR", os.environ)

    def test_checks_run_with_grad_mode_on_when_set_up_turned_it_off(self) -> None:
        def no_grad(model: Any) -> Any:
            def set_up(self: Any) -> None:
                torch.set_grad_enabled(False)
                self.model = model()
                self.inputs = torch.randn(4, 4)

            return make_case(ModelTests, set_up)

        self.assertPasses(no_grad(Small), "test_all_parameters_updated")
        self.assertFailsWith(
            no_grad(NanGradient),
            "test_finite_outputs_and_gradients",
            "the gradients of linear.weight contain NaN or Inf",
        )
        self.assertTrue(torch.is_grad_enabled())


# -- row 6: files left in the working directory ---------------------------------------------------
class CheckpointingTrainer:
    """Writes its checkpoint into the working directory, as many training scripts do."""

    def __init__(self) -> None:
        self.model = nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 4, generator=generator)
        self.y = torch.randint(0, 2, (8,), generator=generator)

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
            self.optimizer.step()
        torch.save(self.model.state_dict(), "checkpoint.pt")

    def eval(self) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(self.model(self.x), self.y))


class FilesLeftInTheWorkingDirectory(CheckTestCase):
    def test_a_trainer_that_writes_into_the_cwd_is_told_so(self) -> None:
        def set_up(self: Any) -> None:
            self.trainer = CheckpointingTrainer()

        case = make_case(
            TrainerTests, set_up, writer_attribute=None, overfit_epochs=5, overfit_max_loss=10.0
        )
        with in_a_temporary_cwd() as folder, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertPasses(case, "test_overfit_one_batch")
        said = [str(w.message) for w in caught if "working directory" in str(w.message)]
        self.assertEqual(len(said), 1, said)
        self.assertIn(
            f"Case.test_overfit_one_batch left new files in the working directory {folder}: "
            "checkpoint.pt. setUp or the test wrote them there, and they stay after it; write "
            "them into a folder from self.make_temp_dir()",
            said[0],
        )


# -- row 9: the meta device -----------------------------------------------------------------------
class MetaIsRefused(CheckTestCase):
    def test_a_model_on_the_meta_device_is_a_contract_error(self) -> None:
        def on_meta() -> nn.Module:
            with torch.device("meta"):
                return Small()

        self.assertErrorsWith(
            small_case(model=on_meta),
            "test_device_moving",
            "ContractError: self.model set in Case.setUp is on the meta device (linear.weight, "
            "linear.bias hold no values",
        )

    def test_inputs_on_the_meta_device_are_a_contract_error(self) -> None:
        def set_up(self: Any) -> None:
            self.model = Small()
            self.inputs = torch.randn(4, 4, device="meta")

        self.assertErrorsWith(
            make_case(ModelTests, set_up),
            "test_device_moving",
            "ContractError: self.inputs set in Case.setUp holds tensors on the meta device",
        )


# -- rows 11 and 12: an empty batch, a forward without return -------------------------------------
class BadInputsAndOutputs(CheckTestCase):
    def test_an_empty_batch_is_a_contract_error(self) -> None:
        def set_up(self: Any) -> None:
            self.model = Small()
            self.inputs = torch.randn(0, 4)

        self.assertErrorsWith(
            make_case(ModelTests, set_up),
            "test_output_shape",
            "ContractError: self.inputs set in Case.setUp holds an empty batch (self.inputs "
            "(0, 4))",
        )

    def test_a_forward_that_returns_none_is_named(self) -> None:
        for name in ("test_output_shape", "test_all_parameters_updated", "test_batch_independence"):
            with self.subTest(name):
                self.assertFailsWith(
                    small_case(model=ReturnsNone),
                    name,
                    "the model's forward returned None (in ",
                    "a missing return statement?",
                )


# -- row 13: run_distributed's arguments ----------------------------------------------------------
def returns_rank(rank: int, world_size: int) -> int:
    return rank


class RunDistributedArguments(unittest.TestCase):
    def test_a_timeout_that_is_no_positive_number_is_refused_before_any_process(self) -> None:
        for timeout in (0, -1.0, "60"):
            with self.subTest(timeout=timeout):
                with self.assertRaisesRegex(
                    ValueError, "timeout must be a positive number of seconds"
                ):
                    run_distributed(returns_rank, 2, timeout=timeout)  # type: ignore[arg-type]

    def test_a_world_size_that_is_no_int_is_refused(self) -> None:
        with self.assertRaisesRegex(
            TypeError, r"world_size must be an int \(the number of processes\), not 2.0"
        ):
            run_distributed(returns_rank, 2.0)  # type: ignore[arg-type]


# -- row 14: the padding mask ---------------------------------------------------------------------
class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) * attention_mask[..., None]


class PaddingMaskIsValidated(CheckTestCase):
    def case(self, mask: torch.Tensor, **attributes: Any) -> type:
        def set_up(self: Any) -> None:
            self.model = Tokens()
            self.inputs = {"input_ids": torch.randint(0, 10, (2, 6)), "attention_mask": mask}

        return make_case(
            SequenceModelTests,
            set_up,
            sequence_dim=1,
            padding_mask="attention_mask",
            **attributes,
        )

    def test_a_mask_of_another_length_than_the_inputs_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            self.case(torch.ones(2, 5, dtype=torch.long)),
            "test_padding_invariance",
            "ContractError: self.padding_mask set in the class body of Case selects a mask of 5 "
            "positions, but the inputs have 6 at sequence_dim=1",
        )

    def test_a_mask_with_values_other_than_0_and_1_is_a_contract_error(self) -> None:
        mask = torch.tensor([[1, 1, 2, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
        self.assertErrorsWith(
            self.case(mask),
            "test_padding_invariance",
            "selects a mask holding values other than 0 and 1 (0, 1, 2): with padded_value=0 "
            "the checks read 0 as padding and 1 as a real position",
        )

    def test_a_mask_that_marks_everything_padded_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            self.case(torch.zeros(2, 6, dtype=torch.long)),
            "test_causality",
            "selects a mask that marks every position as padding",
            "Set self.padded_value to the value that marks padding",
        )


# -- row 15: a make_trainer that does not take rank and world_size --------------------------------
class MakeTrainerWithoutRanks(CheckTestCase):
    def test_a_make_trainer_passing_rank_on_to_a_trainer_without_it_is_a_contract_error(
        self,
    ) -> None:
        from test_distributed_trainer import ClassifierTrainer, data

        class SingleProcessTrainer(ClassifierTrainer):
            def __init__(self, data: Any) -> None:
                super().__init__(data)

        def set_up(self: Any) -> None:
            self.data = data()
            self.make_trainer = lambda **arguments: SingleProcessTrainer(self.data, **arguments)

        self.assertErrorsWith(
            make_case(DistributedTrainerTests, set_up),
            "test_ddp_training",
            "ContractError: self.make_trainer set in Case.setUp passes the arguments of "
            "make_trainer(rank=",
            "world_size=2) on to a callable that does not take them (",
            "got an unexpected keyword argument 'rank'); DistributedTrainerTests calls it so in "
            "each rank",
            "give make_trainer the parameters rank=0, world_size=1 and use them",
        )


# -- rows 16 and 17: who is named, what is looked at ----------------------------------------------
class OptionMessages(CheckTestCase):
    def test_distributed_options_name_the_mixin_and_where_they_are_set(self) -> None:
        def set_up(self: Any) -> None:
            self.make_trainer = lambda rank=0, world_size=1: None

        case = make_case(DistributedTrainerTests, set_up, world_size=1)
        self.assertErrorsWith(
            case,
            "test_ddp_training",
            "ContractError: self.world_size set in the class body of Case is 1, not an int of "
            "at least 2; DistributedTrainerTests needs the number of processes",
        )
        case = small_case(DistributedModelTests, seed="1")
        self.assertErrorsWith(
            case,
            "test_ddp_gradients",
            "self.seed set in the class body of Case is '1', not an int in [-2**63, 2**64 - 1]; "
            "DistributedModelTests needs the seed",
        )

    def test_a_check_switched_off_by_a_class_attribute_is_no_typo(self) -> None:
        def set_up(self: Any) -> None:
            self.splits = {"train": [(torch.zeros(3), 0), (torch.ones(3), 1)]}

        case = make_case(DatasetTests, set_up, test_sample_shape=None)
        self.assertPasses(case, "test_data_loading")
        loaded = unittest.defaultTestLoader.loadTestsFromTestCase(case)
        self.assertNotIn("test_sample_shape", [test._testMethodName for test in loaded])


# -- row 18: what a long scan costs ---------------------------------------------------------------
class LongScans(CheckTestCase):
    def slow_case(self, **attributes: Any) -> type:
        def set_up(self: Any) -> None:
            self.splits = {"train": Slow()}

        return make_case(DatasetTests, set_up, batch_size=20, num_classes=3, **attributes)

    def test_a_long_scan_says_once_how_to_make_it_cheaper(self) -> None:
        case = self.slow_case()
        with (
            mock.patch.object(dltestkit.data.split, "SLOW_SCAN", 0.05),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            self.assertPasses(case, "test_labels")
            self.assertPasses(case, "test_data_loading")  # the same scan: said once
        said = [str(w.message) for w in caught if "max_samples" in str(w.message)]
        self.assertEqual(len(said), 1, said)
        self.assertRegex(
            said[0],
            r"dltestkit: the scan of split 'train' has read \d+ samples in \d+ s, about [\d,]+ s "
            r"for the 200 samples at this rate \(it stops at scan_time_limit=1800 s\). Set "
            r"self.max_samples \(e.g. self.max_samples = [\d_]+, about a minute at the [\d,]+ "
            r"samples/s seen\) to scan a seeded random subset",
        )

    def test_a_scan_stops_at_its_time_limit_and_the_checks_skip_saying_why(self) -> None:
        case = self.slow_case(scan_time_limit=0.1)
        for name in ("test_data_loading", "test_labels"):
            with self.subTest(name):
                self.assertSkipsWith(
                    case,
                    name,
                    "split 'train': the scan stopped at scan_time_limit=0.1 s, having read",
                    "of 200 samples; the checks judge a whole split or a random subset",
                    "Set self.max_samples (e.g. self.max_samples = ",
                )


# -- row 7: which rank hung -----------------------------------------------------------------------
def one_rank_hangs_in_forward(rank: int, world_size: int) -> int:
    model = nn.parallel.DistributedDataParallel(nn.Linear(3, 1))
    if rank == 1:
        import time

        time.sleep(600)
    model(torch.randn(2, 3)).sum().backward()
    return rank


class HungRanks(unittest.TestCase):
    def test_the_hung_rank_is_named_not_the_one_waiting_for_it_in_all_reduce(self) -> None:
        # (5 s: under pytest -n 2 beside other tests, a rank was seen still setting up DDP,
        # before the line it hangs at, 2 s after it started)
        with self.assertRaises(DistributedError) as caught:
            run_distributed(one_rank_hangs_in_forward, 2, timeout=5)
        failures = caught.exception.failures
        self.assertEqual(list(failures), [1, 0], "the hung rank first")
        self.assertRegex(
            failures[1],
            r"did not finish within 5 s: it hung at test_faults.py:\d+ in "
            r"one_rank_hangs_in_forward \(time.sleep\(600\)\)",
        )
        self.assertIn(
            "stopped after 5 s while it waited in backward(), where DistributedDataParallel "
            "all-reduces the gradients",
            failures[0],
        )
        self.assertIn("it waited for rank 1, which hung (not hung itself)", failures[0])


if __name__ == "__main__":
    unittest.main()
