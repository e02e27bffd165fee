"""DatasetTests on Hugging Face ``datasets`` pipelines: Arrow-backed datasets read as torch
tensors (``with_format``, typed features, ``train_test_split``), a random ``set_transform``,
token ids padded by transformers' ``DataCollatorWithPadding``, and streams made with
``to_iterable_dataset`` (sharded over the workers, shuffled); correct ones pass every check,
an undeclared augmentation and splits cut from the same rows fail with their message."""

from __future__ import annotations

import importlib.util
import unittest
from typing import Any, Dict, List

import numpy as np
import torch
from checkrunner import SEED, make_case
from test_dataset_pipelines import DICT_IMAGES, PassesEveryCheck

from dltestkit import DatasetTests

# (imported in the tests only: importing datasets, with pyarrow and pandas, takes a second and
# makes every process the tests fork larger)
needs_datasets = unittest.skipIf(
    importlib.util.find_spec("datasets") is None, "needs the datasets package (the dev extra)"
)


def images(count: int, seed: int) -> Dict[str, List[Any]]:
    """Columns of image samples: 3x4x4 pixels in [0, 1] (both bounds in the first), 3 labels."""
    pixels = np.random.default_rng(seed).uniform(0, 1, size=(count, 3, 4, 4)).astype(np.float32)
    pixels[0, 0, 0, :2] = (0, 1)
    return {"pixel_values": list(pixels), "label": [i % 3 for i in range(count)]}


def token_ids(count: int, seed: int) -> Dict[str, List[Any]]:
    """Columns of token-id sequences of 3 to 11 ids in 2..99 (0 pads), and 2 labels."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(2, 100, size=rng.integers(3, 12)).tolist() for _ in range(count)]
    ids[0][:2] = [2, 99]
    return {"input_ids": ids, "label": [i % 2 for i in range(count)]}


def random_flip(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
    """A set_transform: each image flipped left to right with probability 1/2."""
    flipped = []
    for pixels in batch["pixel_values"]:
        image = torch.tensor(np.asarray(pixels, dtype=np.float32))
        flipped.append(image.flip(-1) if torch.rand(()) < 0.5 else image)
    return {"pixel_values": flipped, "label": batch["label"]}


def image_case(splits: Any, **attributes: Any) -> type:
    """A DatasetTests class of image splits made by ``splits()`` in setUp."""

    def set_up(self: Any) -> None:
        self.splits = splits()

    return make_case(DatasetTests, set_up, **{**DICT_IMAGES, **attributes})


@needs_datasets
class HuggingFaceDatasets(PassesEveryCheck):
    def setUp(self) -> None:
        from datasets.utils.logging import (
            disable_progress_bar,
            enable_progress_bar,
            is_progress_bar_enabled,
        )

        if is_progress_bar_enabled():
            disable_progress_bar()
            self.addCleanup(enable_progress_bar)

    def test_arrow_tables_transforms_and_streams_pass(self) -> None:
        from datasets import Array3D, ClassLabel, Dataset, Features

        def splits() -> Dict[str, Any]:
            typed = Features(
                {
                    "pixel_values": Array3D((3, 4, 4), "float32"),
                    "label": ClassLabel(names=["cat", "dog", "bird"]),
                }
            )
            table = Dataset.from_dict(images(90, SEED + 1), features=typed).with_format("torch")
            parts = table.train_test_split(test_size=0.25, seed=SEED)
            flipped = Dataset.from_dict(images(40, SEED + 2))
            flipped.set_transform(random_flip)
            stream = Dataset.from_dict(images(48, SEED + 3)).to_iterable_dataset(num_shards=4)
            shuffled = Dataset.from_dict(images(48, SEED + 4)).to_iterable_dataset(num_shards=4)
            return {
                "train": parts["train"],
                "test": parts["test"],
                "flipped": flipped,
                "plain": Dataset.from_dict(images(30, SEED + 5)).with_format("torch"),
                "stream": stream.with_format("torch"),
                "shuffled stream": shuffled.shuffle(seed=SEED, buffer_size=16).with_format("torch"),
            }

        case = image_case(splits, augmented_splits={"flipped"}, max_samples=1000)
        self.assertAllPass(
            case, {"test_augmentation": "split 'stream' is an IterableDataset: comparing two"}
        )

    def test_token_ids_padded_by_a_transformers_collator_pass(self) -> None:
        from datasets import Dataset
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

        vocabulary = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 100)}}
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="[UNK]")),
            pad_token="[PAD]",
            unk_token="[UNK]",
        )

        def set_up(self: Any) -> None:
            self.splits = {
                "train": Dataset.from_dict(token_ids(40, SEED + 1)),
                "test": Dataset.from_dict(token_ids(20, SEED + 2)),
            }
            self.collate_fn = DataCollatorWithPadding(tokenizer, return_tensors="pt")

        case = make_case(
            DatasetTests,
            set_up,
            input_key="input_ids",
            target_key="label",  # in a sample (the collator renames it "labels")
            num_classes=2,
            value_range=(0, 99),
            batch_size=8,
        )
        self.assertAllPass(case, {"test_sample_shape": "self.sample_shape is not set"})

    def test_an_undeclared_set_transform_augmentation_fails(self) -> None:
        from datasets import Dataset

        def splits() -> Dict[str, Any]:
            flipped = Dataset.from_dict(images(40, SEED + 2))
            flipped.set_transform(random_flip)
            return {"train": flipped, "test": Dataset.from_dict(images(30, SEED + 5))}

        self.assertFailsWith(
            image_case(splits),
            "test_augmentation",
            "split 'train' is not in augmented_splits, but loading the same index twice gave "
            "different inputs",
        )

    def test_splits_cut_from_the_same_rows_fail(self) -> None:
        from datasets import Dataset

        def splits() -> Dict[str, Any]:
            # the validation split cut again from the whole table, with another seed
            table = Dataset.from_dict(images(60, SEED + 1)).with_format("torch")
            train = table.train_test_split(test_size=0.25, seed=SEED)["train"]
            val = table.train_test_split(test_size=0.25, seed=SEED + 1)["test"]
            return {"train": train, "val": val}

        self.assertFailsWith(
            image_case(splits),
            "test_split_overlap",
            "splits 'train' and 'val' share inputs",
            "scanned samples of 'val'",
            "also occur in 'train'",
        )


if __name__ == "__main__":
    unittest.main()
