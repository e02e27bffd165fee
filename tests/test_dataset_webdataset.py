"""DatasetTests on WebDataset pipelines (tar shards read as a stream, split by node and by
DataLoader worker, shuffled by shard and in a buffer): they pass every check that a stream
allows; ``with_length``, whose class WebDataset makes at run time and pickle cannot find,
fails test_data_loading, as DataLoader workers started with spawn fail on it."""

from __future__ import annotations

import io
import shutil
import tempfile
import unittest
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch
from test_dataset_pipelines import STREAM_SKIPS, PassesEveryCheck, stream_case

try:
    import webdataset as wds

    MISSING = False
except ImportError:  # the dev extra installs it
    MISSING = True

SHARDS = 4


def write_shards(folder: Path, name: str, samples: int, seed: int) -> List[str]:
    """``samples`` samples of 4 values in [-1, 1] and a class in 0..4, in SHARDS tar shards."""
    generator = np.random.default_rng(seed)
    urls = []
    for shard in range(SHARDS):
        path = str(folder / f"{name}-{shard:03d}.tar")
        with wds.TarWriter(path) as sink:
            for index in range(samples // SHARDS):
                values = io.BytesIO()
                np.save(values, generator.uniform(-1, 1, size=4).astype("float32"))
                label = str(int(generator.integers(0, 5))).encode()
                key = f"{name}{shard:03d}{index:05d}"
                sink.write({"__key__": key, "x.npy": values.getvalue(), "cls": label})
        urls.append(path)
    return urls


def as_label(value: int) -> torch.Tensor:
    return torch.tensor(value)


def pipeline(urls: List[str], shuffle: bool) -> Any:
    """WebDataset's usual pipeline: shards split by node (and by worker), decoded to tensors."""
    dataset = wds.WebDataset(
        urls,
        shardshuffle=len(urls) if shuffle else False,
        nodesplitter=wds.split_by_node,
        empty_check=False,
    )
    if shuffle:
        dataset = dataset.shuffle(16)
    return dataset.decode().to_tuple("x.npy", "cls").map_tuple(torch.from_numpy, as_label)


@unittest.skipIf(MISSING, "needs webdataset (the dev extra)")
class WebDatasetPipelines(PassesEveryCheck):
    def setUp(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="dltestkit-webdataset-"))
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.urls: Tuple[List[str], List[str]] = (
            write_shards(folder, "train", 96, seed=1),
            write_shards(folder, "test", 48, seed=2),
        )

    def test_plain_and_shuffled_pipelines_read_by_two_workers_pass_every_check(self) -> None:
        train, test = self.urls
        for shuffle in (False, True):
            with self.subTest(shuffle=shuffle):
                case = stream_case(
                    pipeline(train, shuffle),
                    pipeline(test, False),
                    max_samples=200,
                    num_workers=2,
                )
                self.assertAllPass(case, STREAM_SKIPS)

    def test_with_length_fails_to_pickle_naming_its_class(self) -> None:
        train, test = self.urls
        case = stream_case(
            pipeline(train, True).with_length(96),
            pipeline(test, False).with_length(48),
            num_workers=2,
        )
        self.assertFailsWith(
            case,
            "test_data_loading",
            "split 'train' cannot be pickled (PicklingError: Can't pickle <class ",
            "WebDataset_Length",
            "so DataLoader workers started with spawn or forkserver",
        )


if __name__ == "__main__":
    unittest.main()
