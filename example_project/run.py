"""Train a VAE on MNIST and log to TensorBoard.

    python run.py --model cnn --epochs 10
    python run.py --generate-data --epochs 1     # offline: generated MNIST-format data
    python run.py --accumulate 4 --precision bf16 --compile   # the training stack of today
    tensorboard --logdir runs

Distributed training on several processes (CPU: gloo; GPUs: nccl), data parallel (DDP,
the default) or fully sharded (FSDP2), checkpointed with torch.distributed.checkpoint and
resumed on any number of processes:

    torchrun --standalone --nproc_per_node 2 run.py --generate-data --epochs 1
    torchrun --standalone --nproc_per_node 2 run.py --generate-data --strategy fsdp \
        --epochs 1 --log-dir runs/fsdp
    torchrun --standalone --nproc_per_node 1 run.py --strategy fsdp --epochs 2 \
        --log-dir runs/fsdp --resume runs/fsdp/checkpoint

Data is read from ``<data-root>/MNIST/raw/`` (default: the ``data`` folder
beside this file). Get it with ``--download`` (real MNIST, needs internet) or
``--generate-data`` (writes generated digit-like images in the MNIST format).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from dataset import MNISTNotFoundError, MyMNIST
from mnist_files import has_mnist, write_mnist
from model import CNNVAE, MLPVAE
from tqdm import tqdm
from trainer import Trainer, shard_vae

HERE = Path(__file__).resolve().parent
MODELS = {"mlp": MLPVAE, "cnn": CNNVAE}
INPUT_SHAPE = (1, 32, 32)
NO_DATA_EXIT_CODE = 2


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a VAE on MNIST, logging to TensorBoard.")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="mlp", help="model type (default: mlp)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="batch size per process; with --accumulate k an optimizer step takes k batches "
        "(default: 128)",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="K",
        help="accumulate the gradients of K batches for each optimizer step (default: 1)",
    )
    parser.add_argument(
        "--precision",
        choices=["32", "bf16", "fp16"],
        default="32",
        help="32: float32; bf16 or fp16: autocast forward passes (fp16 with a GradScaler)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="train the model through torch.compile"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--bottleneck-dim", type=int, default=16, help="latent size (default: 16)")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=HERE / "data",
        help="folder holding MNIST/raw (default: data beside run.py)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="TensorBoard log folder (default: runs/<timestamp> beside run.py)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="auto: CUDA, then MPS, else CPU",
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="DataLoader worker processes (default: 2)"
    )
    parser.add_argument(
        "--image-every", type=int, default=1, help="log reconstructions every N epochs; 0: never"
    )
    parser.add_argument(
        "--download", action="store_true", help="download the real MNIST if it is missing"
    )
    parser.add_argument(
        "--generate-data",
        action="store_true",
        help="if no MNIST is in the data root, write generated MNIST-format files there (offline)",
    )
    parser.add_argument(
        "--generate-sizes",
        default="60000,10000",
        help="train,test sizes for --generate-data (default: 60000,10000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="with several processes: data parallel (ddp, each holds every weight) or fully "
        "sharded (fsdp, each holds a shard of the weights and optimizer state); default: ddp",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a checkpoint folder to resume from (saved on any number of processes); "
        "--epochs counts the epochs trained before it too",
    )
    args = parser.parse_args(argv)
    if args.accumulate < 1:
        parser.error(f"--accumulate must be a positive count, got {args.accumulate}")
    text = args.generate_sizes
    try:
        args.generate_sizes = tuple(int(n) for n in text.split(","))
        if len(args.generate_sizes) != 2 or min(args.generate_sizes) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--generate-sizes must be two positive counts like 60000,10000, got {text!r}")
    return args


def pick_device(name: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun
    if name != "auto":
        device = torch.device(name)
        return (
            torch.device("cuda", local_rank)
            if device.type == "cuda" and device.index is None
            else device
        )
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def start_distributed(device: torch.device) -> int:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in
    the environment); return this process's rank (0 when not started by torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def no_data_message(root: Path) -> str:
    return (
        f"No MNIST data in {root / 'MNIST' / 'raw'}.\n"
        "Get it in one of these ways:\n"
        "  --download        download the real MNIST (needs internet)\n"
        "  --generate-data   write generated MNIST-format files (offline)\n"
        "  --data-root DIR   use a folder that already holds MNIST/raw"
    )


def load_data(args: argparse.Namespace, rank: int = 0) -> Optional[MyMNIST]:
    """The datasets, or None (after printing how to get them) when there is no data. With
    several processes, rank 0 writes or downloads the files while the others wait."""
    if rank != 0:
        dist.barrier()  # rank 0 prepares the files first
        return _open_data(args.data_root, download=False)
    data = _prepare_data(args)
    if dist.is_initialized():
        dist.barrier()
    return data


def _open_data(root: Path, download: bool) -> Optional[MyMNIST]:
    try:
        return MyMNIST(root, download=download)
    except MNISTNotFoundError:
        print(no_data_message(root), file=sys.stderr)
    except (RuntimeError, OSError) as error:  # e.g. a failed download
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        print(f"Could not load MNIST: {first_line}\n{no_data_message(root)}", file=sys.stderr)
    return None


def _prepare_data(args: argparse.Namespace) -> Optional[MyMNIST]:
    root = args.data_root
    if args.generate_data and not has_mnist(root):
        n_train, n_test = args.generate_sizes
        print(
            f"Writing generated MNIST-format data ({n_train} train / {n_test} test) to {root}",
            file=sys.stderr,
        )
        write_mnist(root, n_train=n_train, n_test=n_test, seed=args.seed)
    return _open_data(root, download=args.download)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    rank = start_distributed(device)
    try:
        return train(args, device, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, rank: int) -> int:
    data = load_data(args, rank)
    if data is None:
        return NO_DATA_EXIT_CODE

    seed_everything(args.seed)  # the same on every rank: the model starts the same everywhere
    log_dir = args.log_dir or HERE / "runs" / time.strftime("%Y%m%d-%H%M%S")
    if dist.is_initialized():  # one folder for the run, named by rank 0's clock
        names = [str(log_dir)]
        dist.broadcast_object_list(names, src=0)
        log_dir = Path(names[0])
    model = MODELS[args.model](input_shape=INPUT_SHAPE, bottleneck_dim=args.bottleneck_dim)
    if args.strategy == "fsdp":  # before the optimizer: sharding replaces the parameters
        shard_vae(model.to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoint = log_dir / "checkpoint"  # a folder (torch.distributed.checkpoint)

    with Trainer(
        model,
        data.train_data,
        data.test_data,
        optimizer,
        batch_size=args.batch_size,
        device=device,
        log_dir=log_dir,
        num_workers=args.num_workers,
        image_every=args.image_every,
        accumulation_steps=args.accumulate,
        precision=args.precision,
        compile_backend="inductor" if args.compile else None,
    ) as trainer:
        test_loss = None
        if args.resume is not None:
            trainer.load_checkpoint(args.resume)
            if rank == 0:
                print(f"Resumed from {args.resume} after epoch {trainer.epoch}")
        for epoch in range(trainer.epoch, args.epochs):
            with tqdm(
                total=-(-len(trainer.train_loader) // args.accumulate),  # optimizer steps
                desc=f"epoch {epoch + 1}/{args.epochs}",
                unit="batch",
                disable=rank != 0,
            ) as bar:
                last: Dict[str, float] = {}

                def show(
                    losses: Dict[str, float], bar: tqdm = bar, last: Dict[str, float] = last
                ) -> None:
                    last.update(losses)
                    bar.set_postfix(loss=f"{losses['loss']:.2f}", refresh=False)
                    bar.update()

                test_loss = trainer.train(1, callback=show)
                bar.set_postfix(
                    loss=f"{last.get('loss', float('nan')):.2f}", test_loss=f"{test_loss:.2f}"
                )
        trainer.save_checkpoint(checkpoint)

    if rank != 0:
        return 0
    final = "n/a" if test_loss is None else f"{test_loss:.4f}"
    world = (
        f" x {dist.get_world_size()} processes ({args.strategy})" if dist.is_initialized() else ""
    )
    print(
        f"Trained {args.model} for {args.epochs} epochs on {device}{world}: "
        f"final test loss {final}; "
        f"logs in {log_dir}; checkpoint {checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
