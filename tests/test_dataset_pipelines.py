"""DatasetTests on real data pipelines: torchvision datasets, dict samples, variable-length
token sequences with their collate function, numpy samples, subsets, and streams
(IterableDataset), correct ones passing and broken streams failing with their message."""

from __future__ import annotations

import math
import shutil
import tempfile
import unittest
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch
from checkrunner import CheckTestCase, make_case, run_check
from test_dataset_checks import CHECKS
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, IterableDataset, get_worker_info, random_split

from dltestkit import DatasetTests


def outcomes(case: type) -> Dict[str, Tuple[int, int, List[str]]]:
    """Every check of ``case``: (failures, errors, skip reasons)."""
    found = {}
    for name in CHECKS:
        outcome = run_check(case, name)
        found[name] = (len(outcome.failures), len(outcome.errors), outcome.skips)
    return found


class PassesEveryCheck(CheckTestCase):
    """Run every check; all pass but the skips listed (check -> start of the reason)."""

    def assertAllPass(self, case: type, skips: Dict[str, str]) -> None:
        for name in CHECKS:
            with self.subTest(name):
                if name in skips:
                    self.assertSkipsWith(case, name, skips[name])
                else:
                    self.assertPasses(case, name)


# -- torchvision ------------------------------------------------------------------------
def fake_data_case() -> type:
    from torchvision import transforms
    from torchvision.datasets import FakeData

    def set_up(self: Any) -> None:
        flip = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        self.splits = {
            "train": FakeData(200, (3, 8, 8), 10, transform=flip),
            "train (plain)": FakeData(200, (3, 8, 8), 10, transform=transforms.ToTensor()),
            "test": FakeData(
                100, (3, 8, 8), 10, transform=transforms.ToTensor(), random_offset=10_000
            ),
        }
        self.augmented_splits = {"train"}

    return make_case(
        DatasetTests,
        set_up,
        sample_shape=(3, 8, 8),
        value_range=(0.0, 1.0),
        num_classes=10,
        batch_size=32,
    )


def write_image_folder(root: Path, classes: Dict[str, int], seed: int) -> None:
    """Tiny random RGB PNGs in root/<class>/<n>.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for number in range(count):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            pixels[0, 0] = (0, 255, 0)  # both bounds in every image
            Image.fromarray(pixels).save(root / name / f"{number}.png")


class TorchvisionDatasets(PassesEveryCheck):
    def test_fake_data_passes(self) -> None:
        self.assertAllPass(fake_data_case(), {})

    def test_an_image_folder_passes(self) -> None:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        root = Path(tempfile.mkdtemp(prefix="dltestkit-imagefolder-"))
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        write_image_folder(root / "train", {"cat": 6, "dog": 5}, seed=1)
        write_image_folder(root / "val", {"cat": 3, "dog": 3}, seed=2)

        def set_up(self: Any) -> None:
            self.splits = {
                name: ImageFolder(str(root / name), transform=transforms.ToTensor())
                for name in ("train", "val")
            }

        case = make_case(
            DatasetTests,
            set_up,
            sample_shape=(3, 8, 8),
            value_range=(0.0, 1.0),
            num_classes=2,
            batch_size=4,
        )
        self.assertAllPass(case, {})

    def test_an_image_folder_without_to_tensor_is_told_to_add_it(self) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(tempfile.mkdtemp(prefix="dltestkit-imagefolder-"))
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        write_image_folder(root, {"cat": 2, "dog": 2}, seed=1)
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": ImageFolder(str(root))}),
            batch_size=4,
        )
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'train': the sample at index 0 has a PIL Image as element 0 (the input)",
            "ToTensor",
        )


# -- other kinds of samples -------------------------------------------------------------
#: The options of Hugging Face-style samples {"pixel_values": 3x4x4 in [0, 1], "label": 0..2}.
DICT_IMAGES: Dict[str, Any] = dict(
    input_key="pixel_values",
    target_key="label",
    num_classes=3,
    sample_shape=(3, 4, 4),
    value_range=(0.0, 1.0),
    batch_size=8,
)


class DictSamples(Dataset):
    """Hugging Face-style samples: {"pixel_values": tensor, "label": int}."""

    def __init__(self, seed: int) -> None:
        self.images = torch.rand(30, 3, 4, 4, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"pixel_values": self.images[index], "label": index % 3}


class Tokens(Dataset):
    """Variable-length token sequences (ids 1..99, 0 is padding) with a binary label."""

    def __init__(self, seed: int, size: int = 40) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 12, (size,), generator=generator).tolist()
        self.sequences = [torch.randint(1, 100, (n,), generator=generator) for n in lengths]
        self.sequences[0][:2] = torch.tensor([1, 99])

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.sequences[index], index % 2


def pad_batch(samples: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The collate function of Tokens: pad the sequences with 0."""
    sequences, labels = zip(*samples)
    return pad_sequence(list(sequences), batch_first=True), torch.tensor(labels)


class NumpySamples(Dataset):
    """Samples of numpy arrays and numpy integer labels (the DataLoader converts them)."""

    def __init__(self, seed: int) -> None:
        self.data = np.random.default_rng(seed).uniform(-1, 1, size=(30, 5)).astype(np.float32)
        self.data[0, :2] = (-1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.int64]:
        return self.data[index], np.int64(index % 4)


class OtherSamples(PassesEveryCheck):
    def test_dict_samples_pass_with_input_and_target_keys(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": DictSamples(1), "test": DictSamples(2)}),
            **DICT_IMAGES,
        )
        self.assertAllPass(case, {})

    def test_token_sequences_pass_with_their_padding_collate_fn(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": Tokens(1), "test": Tokens(2)}),
            collate_fn=pad_batch,
            value_range=(0, 99),
            num_classes=2,
            batch_size=8,
        )
        self.assertAllPass(case, {"test_sample_shape": "self.sample_shape is not set"})

    def test_token_sequences_without_their_collate_fn_fail_once(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": Tokens(1), "test": Tokens(2)}),
            value_range=(0, 99),
            num_classes=2,
            batch_size=8,
        )
        found = outcomes(case)
        self.assertEqual(
            [name for name, (failures, errors, _) in found.items() if failures or errors],
            ["test_data_loading"],
        )
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'train': samples cannot be "
            "batched by collate_fn (torch.utils.data.default_collate)",
            "Set self.collate_fn",
        )

    def test_numpy_samples_pass(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(
                self, "splits", {"train": NumpySamples(1), "test": NumpySamples(2)}
            ),
            sample_shape=(5,),
            value_range=(-1.0, 1.0),
            num_classes=4,
            batch_size=8,
        )
        self.assertAllPass(case, {})

    def test_subsets_from_random_split_pass(self) -> None:
        from test_dataset_checks import Images

        def set_up(self: Any) -> None:
            train, test = random_split(
                Images(size=60), [40, 20], generator=torch.Generator().manual_seed(0)
            )
            self.splits = {"train": train, "test": test}

        case = make_case(
            DatasetTests,
            set_up,
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=10,
            batch_size=8,
        )
        self.assertAllPass(case, {})


class TwoViews(Dataset):
    """Contrastive samples ((view1, view2), label): two augmented views of one image."""

    def __init__(self, seed: int, crop_second: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(40, 1, 6, 6, generator=generator) * 2 - 1
        self.images[0].view(-1)[:2] = torch.tensor([-1.0, 1.0])
        self.crop_second = crop_second

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = self.images[index]
        second = image.flip(-1)
        if self.crop_second and index == 7:
            second = second[:, :, :-1]
        return (image, second), index % 4


class Multimodal(Dataset):
    """{"inputs": {"image": tensor, "meta": tensor}, "label": int}."""

    def __init__(self, seed: int) -> None:
        self.views = TwoViews(seed)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> Any:
        (image, _), label = self.views[index]
        return {"inputs": {"image": image, "meta": torch.tensor([index / 10])}, "label": label}


class TokenLists(Dataset):
    """What a tokenized Hugging Face datasets.Dataset without a torch format gives: dicts of
    Python lists, padded to tensors by the DataLoader's collate function."""

    def __init__(self, seed: int, ragged: bool = False) -> None:
        self.tokens = Tokens(seed)
        self.ragged = ragged

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ids, label = self.tokens[index]
        sample = {"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "label": label}
        if self.ragged:  # a list of sentences of different lengths, not one tensor
            sample["input_ids"] = [ids.tolist(), ids.tolist()[:2]]
        return sample


def pad_token_lists(samples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """A DataCollatorWithPadding-like collate function."""
    return {
        key: pad_sequence([torch.as_tensor(sample[key]) for sample in samples], batch_first=True)
        for key in ("input_ids", "attention_mask")
    } | {"labels": torch.tensor([sample["label"] for sample in samples])}


def table_case() -> type:
    """A table of 5 discrete features (3 levels each: 243 distinct rows) with noisy binary
    labels, split at random: equal rows in both splits and with both labels are legitimate."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randint(0, 3, (600, 5), generator=generator).float() / 2
    labels = (features.sum(1) - 2.5 + torch.randn(600, generator=generator) > 0).long()
    table = torch.utils.data.TensorDataset(features, labels)

    def set_up(self: Any) -> None:
        train, test = random_split(table, [480, 120], generator=torch.Generator().manual_seed(1))
        self.splits = {"train": train, "test": test}

    return make_case(
        DatasetTests,
        set_up,
        sample_shape=(5,),
        value_range=(0.0, 1.0),
        num_classes=2,
        batch_size=64,
    )


class NestedAndListSamples(PassesEveryCheck):
    def test_two_views_pass_each_view_checked(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": TwoViews(1), "test": TwoViews(2)}),
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=4,
            batch_size=8,
        )
        self.assertAllPass(case, {})

    def test_a_wrong_shape_in_the_second_view_fails_naming_it(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(
                self, "splits", {"train": TwoViews(1), "test": TwoViews(2, crop_second=True)}
            ),
            sample_shape=(1, 6, 6),
            batch_size=8,
        )
        self.assertFailsWith(
            case,
            "test_sample_shape",
            "split 'test': 1 of the 80 input tensors of 40 samples do not have sample_shape "
            "(1, 6, 6): (1, 6, 5) as sample[0][1] at index 7.",
            "self.input_key = (0, 0)",
        )

    def test_multimodal_samples_pass_with_a_path_as_input_key(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": Multimodal(1), "test": Multimodal(2)}),
            input_key=("inputs", "image"),
            target_key="label",
            sample_shape=(1, 6, 6),
            value_range=(-1.0, 1.0),
            num_classes=4,
            batch_size=8,
        )
        self.assertAllPass(case, {})
        case.input_key = None  # the whole input: its "meta" tensor is outside the range
        self.assertFailsWith(
            case,
            "test_value_range",
            "max 3.9 (index 39, sample['inputs']['meta'])",
            "Every tensor of a nested input must lie in value_range; to check one of them, set "
            "self.input_key to its path, e.g. self.input_key = ('inputs', 'image')",
        )

    def test_lists_of_token_ids_pass_with_their_padding_collate_fn(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": TokenLists(1), "test": TokenLists(2)}),
            input_key="input_ids",
            target_key="label",
            collate_fn=pad_token_lists,
            value_range=(0, 99),
            num_classes=2,
            batch_size=8,
        )
        self.assertAllPass(case, {"test_sample_shape": "self.sample_shape is not set"})
        case.collate_fn = None  # the collate function still runs on the real samples
        self.assertFailsWith(
            case,
            "test_data_loading",
            "samples cannot be batched by collate_fn (torch.utils.data.default_collate)",
        )

    def test_a_list_that_is_no_tensor_names_with_format(self) -> None:
        case = make_case(
            DatasetTests,
            lambda self: setattr(self, "splits", {"train": TokenLists(1, ragged=True)}),
            input_key="input_ids",
            collate_fn=pad_token_lists,
            batch_size=8,
        )
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'train': the sample at index 0 has a list as element 'input_ids' (the input) "
            "that torch.as_tensor cannot convert it (ValueError: expected sequence of length",
            "dataset.with_format('torch')",
        )

    def test_a_random_split_table_passes_with_its_tuning_options(self) -> None:
        case = table_case()
        self.assertFailsWith(
            case, "test_split_overlap", "set self.max_shared_fraction = 0.86 (now 0)"
        )
        self.assertFailsWith(case, "test_labels", "set self.max_label_conflicts = 0.18")
        case.max_shared_fraction, case.max_label_conflicts = 0.9, 0.2
        self.assertAllPass(case, {})


# -- streams ----------------------------------------------------------------------------
class Stream(IterableDataset):
    """``size`` samples (a 4-vector in [-1, 1], a label in 0..4), each DataLoader worker
    reading its own contiguous shard, as in the IterableDataset documentation."""

    def __init__(self, size: int = 48, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.data = torch.rand(size, 4, generator=generator) * 2 - 1
        self.data[0, :2] = torch.tensor([-1.0, 1.0])
        self.start, self.end = 0, size

    def shard(self) -> range:
        info = get_worker_info()
        if info is None:
            return range(self.start, self.end)
        per_worker = math.ceil((self.end - self.start) / info.num_workers)
        start = self.start + info.id * per_worker
        return range(start, min(start + per_worker, self.end))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        for index in self.shard():
            yield self.data[index], index % 5


class SizedStream(Stream):
    def __len__(self) -> int:
        return len(self.data)


class RepeatedInEveryWorker(SizedStream):
    """The classic bug: no sharding, so every worker reads the whole stream."""

    def shard(self) -> range:
        return range(self.start, self.end)


class InitShardedStream(Stream):
    """Sharded by a worker_init_fn (the documentation's second example)."""

    def shard(self) -> range:
        return range(self.start, self.end)


def shard_worker(worker_id: int) -> None:
    info = get_worker_info()
    dataset = info.dataset
    per_worker = math.ceil((dataset.end - dataset.start) / info.num_workers)
    dataset.start = dataset.start + worker_id * per_worker
    dataset.end = min(dataset.start + per_worker, dataset.end)


class ShuffledCopies(Stream):
    """The bug in a stream without __len__ that shuffles: every worker reads the whole
    stream, each in its own order (a shuffle buffer, shard order)."""

    def shard(self) -> range:
        return range(self.start, self.end)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        for index in torch.randperm(self.end).tolist():
            yield self.data[index], index % 5


class ShardedWithDuplicates(SizedStream):
    """A correctly sharded stream (every num_workers-th record) with genuine duplicates: 8
    records repeated elsewhere, and 12 silent (all-zero) records."""

    def __init__(self, seed: int) -> None:
        super().__init__(size=240, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        spots = torch.randperm(239, generator=generator)[:20].add(1).tolist()
        for copy, original in zip(spots[:8], spots[8:16]):
            self.data[copy] = self.data[original]
        self.data[spots[16:] + list(range(60, 68))] = 0.0

    def shard(self) -> range:
        info = get_worker_info()
        return range(self.end) if info is None else range(info.id, self.end, info.num_workers)


class WrongLength(SizedStream):
    def __len__(self) -> int:
        return len(self.data) + 10


class ShardsOffByOne(Stream):
    """Files of 8 samples dealt to the workers from the second one on: the first file is
    never read by a worker."""

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        info = get_worker_info()
        files = [range(n, min(n + 8, self.end)) for n in range(self.start, self.end, 8)]
        mine = files if info is None else files[info.id + 1 :: info.num_workers]  # bug: + 1
        for file in mine:
            for index in file:
                yield self.data[index], index % 5


class FailsInWorker(SizedStream):
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        for number, sample in enumerate(super().__iter__()):
            if get_worker_info() is not None and number == 5:
                raise ConnectionError("shard 3 of s3://bucket/data is gone")
            yield sample


class EmptyStream(SizedStream):
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        return iter(())


def stream_case(train: IterableDataset, test: IterableDataset, **attributes: Any) -> type:
    def set_up(self: Any) -> None:
        self.splits = {"train": train, "test": test}

    options = {
        "sample_shape": (4,),
        "value_range": (-1.0, 1.0),
        "num_classes": 5,
        "batch_size": 4,
        **attributes,
    }
    return make_case(DatasetTests, set_up, **options)


STREAM_SKIPS = {
    "test_augmentation": "split 'train' is an IterableDataset: comparing two "
    "loads of the same sample needs indices"
}


class Streams(PassesEveryCheck):
    def test_a_sized_stream_sharded_by_worker_passes(self) -> None:
        self.assertAllPass(stream_case(SizedStream(seed=1), SizedStream(seed=2)), STREAM_SKIPS)

    def test_a_stream_without_len_passes_with_max_samples(self) -> None:
        case = stream_case(Stream(seed=1), Stream(seed=2), max_samples=100)
        self.assertAllPass(case, STREAM_SKIPS)

    def test_a_stream_without_len_needs_max_samples(self) -> None:
        case = stream_case(Stream(seed=1), Stream(seed=2))
        self.assertErrorsWith(
            case,
            "test_value_range",
            "ContractError",
            "split 'train' set in Case.setUp is an IterableDataset without __len__",
            "set self.max_samples",
        )

    def test_a_stream_sharded_by_a_worker_init_fn_passes_with_it(self) -> None:
        case = stream_case(
            InitShardedStream(seed=1),
            InitShardedStream(seed=2),
            max_samples=100,
            worker_init_fn=shard_worker,
        )
        self.assertAllPass(case, STREAM_SKIPS)

    def test_a_capped_scan_reads_about_max_samples(self) -> None:
        case = stream_case(SizedStream(seed=1), SizedStream(seed=2), max_samples=10)
        self.assertAllPass(case, STREAM_SKIPS)

    def test_a_stream_repeated_in_every_worker_fails(self) -> None:
        case = stream_case(SizedStream(seed=1), RepeatedInEveryWorker(seed=2))
        # the scan stops one batch past len(): the workers' first 24 samples each
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the DataLoader workers read the same samples: 24 of the 24 inputs "
            "read more than once were read once by each of several of the 2 workers (e.g. "
            "sample 0 of worker 0 = sample 0 of worker 1), 24 of them as the same sample number "
            "of each worker; were they duplicates within the stream, a stream that gives each "
            "worker its own shard would have given about 12 of them to one worker twice, not "
            "0.",
            "get_worker_info()",
        )

    def test_the_repeated_stream_is_caught_when_capped_too(self) -> None:
        case = stream_case(SizedStream(seed=1), RepeatedInEveryWorker(seed=2), max_samples=16)
        self.assertFailsWith(
            case, "test_data_loading", "the DataLoader workers read the same samples"
        )

    def test_a_shuffled_stream_read_by_every_worker_fails_for_any_workers_and_cap(self) -> None:
        for workers, cap in ((3, 10_000), (2, 128), (3, 128)):
            with self.subTest(workers=workers, max_samples=cap):
                case = stream_case(
                    Stream(seed=1),
                    ShuffledCopies(size=150, seed=2),
                    augmented_splits={"test"},
                    num_workers=workers,
                    max_samples=cap,
                    batch_size=16,
                )
                self.assertFailsWith(
                    case,
                    "test_data_loading",
                    "split 'test': the DataLoader workers read the same samples: ",
                    "inputs read more than once were read once by each of several of the "
                    f"{workers} workers (e.g. sample ",
                )

    def test_a_sharded_stream_with_duplicates_passes_for_any_workers(self) -> None:
        for workers in (1, 2, 3):
            with self.subTest(workers=workers):
                case = stream_case(
                    ShardedWithDuplicates(seed=1),
                    ShardedWithDuplicates(seed=2),
                    num_workers=workers,
                    batch_size=16,
                    max_shared_fraction=0.2,  # the silent records are in both
                )
                self.assertPasses(case, "test_data_loading")

    def test_a_wrong_len_fails(self) -> None:
        case = stream_case(SizedStream(seed=1), WrongLength(seed=2))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the DataLoader's 2 workers "
            "read 48 samples from the stream, but len() says 58",
        )

    def test_shards_that_leave_data_out_fail(self) -> None:
        case = stream_case(Stream(seed=1), ShardsOffByOne(seed=2), max_samples=100)
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': 8 of the first 8 samples "
            "read in the main process were read by no DataLoader worker "
            "(sample 0 of the stream read in the main process",
        )

    def test_a_stream_that_raises_in_a_worker_fails_naming_it(self) -> None:
        case = stream_case(SizedStream(seed=1), FailsInWorker(seed=2))
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'test': the DataLoader (batch_size=4, num_workers=2) failed while loading after",
            "Caught ConnectionError in DataLoader worker process",
            "ConnectionError: shard 3 of s3://bucket/data is gone",
        )
        self.assertSkipsWith(
            case,
            "test_value_range",
            "split 'test' cannot be loaded (the DataLoader failed); see test_data_loading",
        )

    def test_an_empty_stream_fails(self) -> None:
        case = stream_case(SizedStream(seed=1), EmptyStream())
        self.assertFailsWith(case, "test_data_loading", "split 'test' is an empty stream")

    def test_a_stream_and_a_map_style_split_are_compared_for_overlap(self) -> None:
        from test_dataset_checks import Images

        class Test(Dataset):  # a map-style view of the stream's first 16 samples
            def __len__(self) -> int:
                return 16

            def __getitem__(self, index: int) -> Any:
                return STREAM.data[index], index % 5

        def set_up(self: Any) -> None:
            self.splits = {"train": STREAM, "test": Test(), "other": Images()}

        case = make_case(DatasetTests, set_up, batch_size=4)
        self.assertFailsWith(
            case,
            "test_split_overlap",
            "splits 'train' and 'test' share "
            "inputs: 16 of the 16 scanned samples of 'test' (100.0%) also occur "
            "in 'train', e.g. train sample 0 of worker 0 = test index 0",
        )


STREAM = SizedStream(seed=3)


if __name__ == "__main__":
    unittest.main()
