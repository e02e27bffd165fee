"""The setUp contract, seeding, state restoration and the temporary-folder helper."""

from __future__ import annotations

import os
import random
import sys
import types
import unittest
from typing import Any, List
from unittest import mock

import numpy as np
import torch
from checkrunner import CheckTestCase, make_case, run_check
from test_dataset_checks import Images
from test_model_checks import AutoEncoder, WithBatchNorm, model_case

from dltestkit import DatasetTests, ModelTests, TrainerTests, make_deterministic
from dltestkit.core.contract import checks_of
from dltestkit.core.seeds import derived_seed, seed_torch


class Contract(CheckTestCase):
    def test_a_missing_required_attribute_names_it_the_mixin_and_setup(self) -> None:
        def set_up(self: Any) -> None:
            self.split = {"train": Images()}

        text = self.assertErrorsWith(
            make_case(DatasetTests, set_up),
            "test_sample_shape",
            "ContractError",
            "Case.setUp must set self.splits",
            "DatasetTests needs a dict mapping split name",
            "Did you mean self.split?",
        )
        self.assertNotIn("AttributeError", text)

    def test_a_misspelled_optional_attribute_is_not_silently_ignored(self) -> None:
        def set_up(self: Any) -> None:
            self.splits = {"train": Images()}
            self.value_ranges = (-1.0, 1.0)

        self.assertErrorsWith(
            make_case(DatasetTests, set_up),
            "test_value_range",
            "Case sets self.value_ranges (in setUp or the class body), "
            "which no dltestkit mixin reads",
            "Did you mean self.value_range (DatasetTests: the inclusive",
        )

    def test_a_misspelled_class_attribute_is_caught_too(self) -> None:
        case = model_case(AutoEncoder)
        case.allowed_unchanged_parameter = ["x"]
        self.assertErrorsWith(
            case, "test_output_shape", "Did you mean self.allowed_unchanged_parameters"
        )

    def test_a_mistyped_attribute_says_what_it_should_be(self) -> None:
        def set_up(self: Any) -> None:
            self.model = AutoEncoder
            self.inputs = torch.randn(4, 1, 4, 4)

        self.assertErrorsWith(
            make_case(ModelTests, set_up),
            "test_output_shape",
            "self.model set in Case.setUp is a type, not a torch.nn.Module",
        )

    def test_a_class_of_several_mixins_names_the_mixin_that_reads_the_attribute(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = AutoEncoder(), torch.randn(4, 1, 4, 4)
            self.splits = [Images()]

        case = type("Case", (DatasetTests, ModelTests, unittest.TestCase), {"setUp": set_up})
        text = self.assertErrorsWith(
            case,
            "test_output_shape",
            "self.splits set in Case.setUp is a list, not a non-empty dict; DatasetTests needs",
        )
        self.assertNotIn("ModelTests needs", text)

    def test_shapes_refuse_bools_and_negative_sizes(self) -> None:
        for shape in [(4, True), (4, -1), [4, 1.0], torch.Size([4, 16]), "4, 16"]:
            with self.subTest(shape=shape):
                case = model_case(AutoEncoder, expected_output_shape=shape)
                outcome = run_check(case, "test_output_shape")
                if isinstance(shape, torch.Size):
                    self.assertEqual(outcome.errors, [])
                else:
                    self.assertIn("not a shape (a tuple of non-negative ints)", outcome.errors[0])

    def test_a_misspelled_factory_method_is_a_contract_error_not_a_skip(self) -> None:
        class Case(model_case(AutoEncoder)):  # type: ignore[misc]
            def make_modle(self) -> torch.nn.Module:
                return AutoEncoder()

        self.assertErrorsWith(
            Case,
            "test_state_dict_round_trip",
            "ContractError",
            "self.make_model is not set, but Case defines 'make_modle': did you mean "
            "self.make_model? ModelTests needs a zero-argument callable",
        )

    def test_an_unset_factory_without_a_close_name_skips_naming_it(self) -> None:
        self.assertSkipsWith(
            model_case(AutoEncoder), "test_state_dict_round_trip", "self.make_model is not set"
        )

    def test_an_option_set_under_its_former_name_still_works_with_a_warning(self) -> None:
        from dltestkit.core.contract import check
        from dltestkit.core.options import option

        def test_value(self: Any) -> None:
            """Check that the value arrives under the new name."""
            self.assertEqual(self.tolerance, 0.5)

        renamed = type(
            "Renamed",
            (ModelTests,),
            {
                "__module__": "dltestkit.renamed_for_a_test",
                "__annotations__": {"tolerance": "float"},
                "tolerance": option(0.0, example="0.1", formerly=("tol",), doc="A tolerance."),
                "test_value": check(reads=("tolerance",))(test_value),
            },
        )

        def set_up(self: Any) -> None:
            self.model, self.inputs = AutoEncoder(), torch.randn(4, 1, 4, 4)
            self.tol = 0.5  # the former name

        case = make_case(renamed, set_up)
        with self.assertWarnsRegex(
            DeprecationWarning, r"Case sets self.tol, which ModelTests now calls self.tolerance"
        ):
            self.assertPasses(case, "test_value")

    def test_an_option_means_what_its_docstring_says(self) -> None:
        from dltestkit.core.options import option

        # a mixin of the library (its module's name starts with dltestkit.), in this file
        module = types.ModuleType("dltestkit.documented_for_a_test")
        module.__file__ = __file__
        patch = mock.patch.dict(sys.modules, {module.__name__: module})
        patch.start()
        self.addCleanup(patch.stop)

        class Documented(ModelTests):
            __module__ = module.__name__

            tolerance: float = option(0.0, example="0.1")
            """The tolerance of a comparison.

            More for the docs."""

            undocumented: float = option(0.0, example="0.1")

        declared = Documented._own_options  # type: ignore[attr-defined]
        self.assertEqual(declared["tolerance"].meaning, "the tolerance of a comparison")
        self.assertEqual(declared["tolerance"].details, "More for the docs.")
        with self.assertRaisesRegex(
            TypeError,
            r"option .*Documented.undocumented \(dltestkit\.documented_for_a_test\) has no "
            "docstring: write what it means in a docstring on the line under its declaration",
        ):
            _ = declared["undocumented"].meaning

    def test_unrelated_user_attributes_are_allowed(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = AutoEncoder(), torch.randn(4, 1, 4, 4)
            self.data_root = "/nowhere"

        self.assertPasses(make_case(ModelTests, set_up), "test_output_shape")

    def test_a_test_class_without_testcase_is_refused(self) -> None:
        with self.assertRaisesRegex(
            TypeError,
            "uses ModelTests but not unittest.TestCase, so unittest would run none of its checks",
        ):
            type("TestForgotten", (ModelTests,), {})

    def test_testcase_before_the_mixin_is_refused(self) -> None:
        with self.assertRaisesRegex(TypeError, "put the mixin first"):
            type("TestWrongOrder", (unittest.TestCase, TrainerTests), {})

    def test_an_intermediate_base_without_testcase_is_allowed(self) -> None:
        base = type("SharedModelChecks", (ModelTests,), {})
        type("TestConcrete", (base, unittest.TestCase), {})


class Seeding(CheckTestCase):
    def test_setup_and_checks_are_seeded_and_global_state_is_restored(self) -> None:
        seen: List[torch.Tensor] = []

        def set_up(self: Any) -> None:
            seen.append(torch.rand(3))
            self.model, self.inputs = AutoEncoder(), torch.randn(4, 1, 4, 4)

        case = make_case(ModelTests, set_up)
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        torch.backends.cudnn.deterministic = False
        states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
        for _ in range(2):
            self.assertPasses(case, "test_all_parameters_updated")
        self.assertTrue(torch.equal(seen[0], seen[1]))
        self.assertEqual(random.getstate(), states[0])
        self.assertTrue(np.array_equal(np.random.get_state()[1], states[1]))
        self.assertTrue(torch.equal(torch.get_rng_state(), states[2]))
        self.assertFalse(torch.backends.cudnn.deterministic)

    def test_a_failure_names_the_seed(self) -> None:
        from test_model_checks import DeadLayer

        case = model_case(DeadLayer)
        case.seed = 1234
        self.assertFailsWith(case, "test_all_parameters_updated", "ran with seed=1234")

    def test_a_failure_inside_a_subtest_names_the_seed_too(self) -> None:
        from test_dataset_checks import splits_case

        case = splits_case(Images(augment=True), Images(low=0.0))
        case.seed = 77
        self.assertFailsWith(
            case,
            "test_value_range",
            "split 'test' does not use",
            "Case.test_value_range ran with seed=77",
        )

    def test_a_seed_that_is_not_an_int_is_refused(self) -> None:
        case = model_case(AutoEncoder)
        case.seed = "1"
        self.assertErrorsWith(
            case, "test_output_shape", "self.seed set in the class body of Case is '1', not an int"
        )

    def test_a_seed_outside_torchs_range_is_a_contract_error_not_a_crash(self) -> None:
        for seed in (2**64, -(2**63) - 1):
            with self.subTest(seed=seed):
                case = model_case(AutoEncoder)
                case.seed = seed
                self.assertErrorsWith(
                    case, "test_output_shape", "ContractError", "not an int in [-2**63, 2**64 - 1]"
                )

    def test_seeds_at_the_ends_of_the_range_run_every_check(self) -> None:
        # derived seeds (seed + 1, seed + steps) stay in torch's range
        for seed in (2**64 - 1, -(2**63), -1):  # BatchNorm: test_running_statistics runs too
            case = model_case(WithBatchNorm, make_model=WithBatchNorm)
            case.seed = seed
            for name in checks_of(case):
                with self.subTest(seed=seed, check=name):
                    self.assertPasses(case, name)

    def test_derived_seeds_wrap_into_torchs_range(self) -> None:
        self.assertEqual(derived_seed(2**64 - 1, 1), 0)
        self.assertEqual(derived_seed(-1, 1), 0)
        self.assertEqual(derived_seed(5, 3), 8)
        for seed in (2**64 - 1, -(2**63), 0):
            torch.manual_seed(derived_seed(seed, 10**6))  # accepted

    def test_a_seed_set_in_setup_is_refused_with_the_fix(self) -> None:
        def set_up(self: Any) -> None:
            self.model, self.inputs = AutoEncoder(), torch.randn(4, 1, 4, 4)
            self.seed = 5

        self.assertErrorsWith(
            make_case(ModelTests, set_up),
            "test_output_shape",
            "Case.setUp sets self.seed, but setUp already ran seeded",
            "`seed = 5` in the class body",
        )

    def test_make_deterministic_seeds_every_generator(self) -> None:
        draws = []
        for _ in range(2):
            make_deterministic(5)
            draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
        self.assertEqual(draws[0], draws[1])
        self.assertTrue(torch.backends.cudnn.deterministic)
        self.assertFalse(torch.backends.cudnn.benchmark)

    def test_seed_torch_seeds_as_torch_manual_seed_does(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            expected = torch.rand(4)
            seed_torch(7)
            self.assertTrue(torch.equal(torch.rand(4), expected))
            # where an accelerator could run, torch.manual_seed seeds it too
            for present in (False, True):
                with mock.patch.object(torch.cuda, "is_available", return_value=present):
                    with mock.patch.object(torch, "manual_seed", wraps=torch.manual_seed) as full:
                        seed_torch(7)
                self.assertEqual(full.call_count, int(present), f"accelerator: {present}")


class Threads(CheckTestCase):
    def threads_seen(self, **attributes: Any) -> List[int]:
        seen: List[int] = []

        class Watching(AutoEncoder):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                seen.append(torch.get_num_threads())
                return super().forward(x)

        self.assertPasses(model_case(Watching, **attributes), "test_output_shape")
        return seen

    def test_checks_run_with_one_thread_and_restore_the_setting(self) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            self.assertEqual(set(self.threads_seen()), {1})
            self.assertEqual(torch.get_num_threads(), 2)
            self.assertEqual(set(self.threads_seen(num_threads=2)), {2})  # set in setUp
            torch.set_num_threads(3)
            self.assertEqual(set(self.threads_seen(num_threads=None)), {3})
            self.assertEqual(torch.get_num_threads(), 3)
        finally:
            torch.set_num_threads(before)

    def test_a_bad_thread_count_is_a_contract_error(self) -> None:
        self.assertErrorsWith(
            model_case(AutoEncoder, num_threads=0),
            "test_output_shape",
            "self.num_threads set in Case.setUp is 0, not a positive int",
        )


class TemporaryFolder(CheckTestCase):
    def test_the_folder_is_removed_even_when_the_check_fails(self) -> None:
        folders: List[str] = []

        def set_up(self: Any) -> None:
            folder = self.make_temp_dir()
            (folder / "events").write_text("x")
            folders.append(str(folder))
            self.model, self.inputs = AutoEncoder(), torch.randn(4, 1, 4, 4)
            self.expected_output_shape = (4, 3)

        outcome = run_check(make_case(ModelTests, set_up), "test_output_shape")
        self.assertTrue(outcome.failures)
        self.assertTrue(os.path.isabs(folders[0]))
        self.assertFalse(os.path.exists(folders[0]))


if __name__ == "__main__":
    unittest.main()
