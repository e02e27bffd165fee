"""Trainers of the training stack of today, for the tests of the trainer checks of
gradient accumulation, retained graphs, mixed precision and compiled training (not a test
module): a plain classifier loop and a transformers-style language-model loop with padding,
each correct, with one-bug subclasses.

Both take what the checks pass to ``make_trainer``: ``accumulation_steps`` (k micro-batches of
batch_size // k per optimizer step), ``precision`` ("32" or "bf16": bfloat16 autocast),
``grad_scale`` (a ``GradScaler`` whose scale starts there) and ``compile_backend`` (the model
compiled with it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

#: 10 fixed samples of 4 classes: batches of 4 leave a partial last batch of 2
_DATA = torch.Generator().manual_seed(0)
INPUTS = torch.randn(10, 8, generator=_DATA)
TARGETS = torch.arange(10) % 4


class Writer:
    """Stands in for a SummaryWriter."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32))
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


class StackTrainer:
    """A classifier trained in batches of ``batch_size`` (each of ``accumulation_steps``
    micro-batches), with Adam, a learning rate halved every epoch, optional bfloat16 autocast,
    GradScaler and torch.compile. Correct: each micro-batch's summed loss is divided by the
    number of samples in its window; the last, partial window is stepped too."""

    batch_size = 4

    def __init__(
        self,
        accumulation_steps: int = 1,
        precision: str = "32",
        grad_scale: Optional[float] = None,
        compile_backend: Any = None,
    ) -> None:
        self.k = accumulation_steps
        self.micro_batch = self.batch_size // accumulation_steps
        self.precision = precision
        self.model = Net()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, 0.5)
        self.scaler = (
            torch.amp.GradScaler("cpu", init_scale=grad_scale) if grad_scale is not None else None
        )
        self.forward = (
            torch.compile(self.model, backend=compile_backend)
            if compile_backend is not None
            else self.model
        )
        self.summary = Writer()
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        self.step = 0

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def windows(self) -> Iterator[List[torch.Tensor]]:
        order = torch.randperm(len(INPUTS), generator=self.generator)
        batches = list(order.split(self.micro_batch))
        for start in range(0, len(batches), self.k):
            yield batches[start : start + self.k]

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        with self.autocast():
            output = self.forward(INPUTS[batch])
        return F.cross_entropy(output.float(), TARGETS[batch], reduction="sum") / count

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def train_window(self, window: List[torch.Tensor]) -> float:
        count = sum(len(batch) for batch in window)
        total = 0.0
        for batch in window:
            loss = self.loss(batch, count, len(window))
            self.backward(loss)
            total += loss.item()
        self.optimizer_step()
        return total

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.train()
            for window in self.windows():
                loss = self.train_window(window)
                self.summary.add_scalar("train/loss", loss, self.step)
                self.step += 1
            self.scheduler.step()

    def eval(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                return F.cross_entropy(self.forward(INPUTS).float(), TARGETS).item()
        finally:
            self.model.train(was_training)


# -- gradient accumulation: one bug each ------------------------------------------------
class NotDividedByK(StackTrainer):
    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(INPUTS[batch]), TARGETS[batch])


class DividedTwice(StackTrainer):
    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(INPUTS[batch]), TARGETS[batch]) / self.k / self.k


class DividedByKInAPartialWindow(StackTrainer):
    """The mean loss divided by k: right for full windows of equal micro-batches."""

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(INPUTS[batch]), TARGETS[batch]) / self.k


class DividedByTheWindow(StackTrainer):
    """Correct for micro-batches of equal size: the mean loss divided by the window's length."""

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        return F.cross_entropy(self.forward(INPUTS[batch]), TARGETS[batch]) / window


class FlatLoop(StackTrainer):
    """Counts micro-batches over the epoch and steps every k-th."""

    def first(self, index: int) -> bool:
        return (index + 1) % self.k == 0

    def step_at_the_end(self) -> bool:
        return True

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.train()
            batches = list(
                torch.randperm(len(INPUTS), generator=self.generator).split(self.micro_batch)
            )
            for index, batch in enumerate(batches):
                self.backward(self.loss(batch, self.batch_size, self.k))
                if self.first(index) or (self.step_at_the_end() and index == len(batches) - 1):
                    self.optimizer_step()
            self.scheduler.step()


class StepBeforeTheLastMicroBatch(FlatLoop):
    def first(self, index: int) -> bool:
        return index % self.k == 0


class DropsThePartialWindow(FlatLoop):
    def step_at_the_end(self) -> bool:
        return False


class ZeroesEveryMicroBatch(StackTrainer):
    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        super().backward(loss)


class SchedulerEveryMicroBatch(StackTrainer):
    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.scheduler.step()

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.train()
            for window in self.windows():
                self.train_window(window)


# -- retained graphs: one bug each ------------------------------------------------------
class KeepsTheTotalLoss(StackTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.total_loss: Any = 0.0

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.total_loss += loss  # keeps every step's graph


class KeepsAListOfLosses(StackTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: Dict[str, List[torch.Tensor]] = {"loss": []}

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.history["loss"].append(loss)


class EvaluatesWithGradients(StackTrainer):
    """eval() without no_grad, keeping its losses: every evaluation's graph stays alive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evaluations: List[torch.Tensor] = []

    def eval(self) -> float:
        self.model.eval()
        loss = F.cross_entropy(self.forward(INPUTS), TARGETS)
        self.evaluations.append(loss)
        self.model.train()
        return loss.item()


class KeepsTheLastLoss(StackTrainer):
    """Correct: keeps the last step's loss, whose graph is replaced every step."""

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.last_loss = loss


# -- mixed precision: one bug each --------------------------------------------------------
class ClipsBeforeUnscaling(StackTrainer):
    def optimizer_step(self) -> None:
        if self.scaler is None:
            super().optimizer_step()
            return
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()


class ClipsAfterUnscaling(StackTrainer):
    """Correct."""

    def optimizer_step(self) -> None:
        if self.scaler is None:
            super().optimizer_step()
            return
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()


class BypassesTheScaler(StackTrainer):
    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


class NeverUpdatesTheScaler(StackTrainer):
    def optimizer_step(self) -> None:
        if self.scaler is None:
            super().optimizer_step()
            return
        self.scaler.step(self.optimizer)
        self.optimizer.zero_grad()


# -- a transformers-style loop: a language model on padded sequences ----------------------
#: 8 sequences of 3 to 8 tokens, right-padded to 8: micro-batches hold different token counts
LENGTHS = [8, 3, 6, 4, 7, 5, 8, 3]
_TOKENS = torch.Generator().manual_seed(1)
IDS = torch.randint(1, 50, (8, 8), generator=_TOKENS)
MASK = (torch.arange(8) < torch.tensor(LENGTHS).unsqueeze(1)).long()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2, pad_token_id=0
    )
    return GPT2LMHeadModel(config)


class LanguageModelTrainer:
    """Trains a tiny GPT-2 as transformers' Trainer does since its 2024 fix: each
    micro-batch's loss is summed over its tokens and divided by the number of tokens in the
    whole window (num_items_in_batch). Batches of 4 sequences, k micro-batches each."""

    batch_size = 4

    def __init__(self, accumulation_steps: int = 1, precision: str = "32") -> None:
        self.k = accumulation_steps
        self.micro_batch = self.batch_size // accumulation_steps
        self.precision = precision
        self.model = tiny_gpt2()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.summary = Writer()
        self.step = 0

    def labels(self, rows: torch.Tensor) -> torch.Tensor:
        return IDS[rows].masked_fill(MASK[rows] == 0, -100)

    def tokens(self, rows: torch.Tensor) -> int:
        return int((self.labels(rows)[:, 1:] != -100).sum())  # the shifted labels

    def loss(self, rows: torch.Tensor, window_tokens: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            output = self.model(
                input_ids=IDS[rows],
                attention_mask=MASK[rows],
                labels=self.labels(rows),
                num_items_in_batch=window_tokens,
            )
        return output.loss

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.train()
            batches = list(torch.arange(len(IDS)).split(self.micro_batch))
            for start in range(0, len(batches), self.k):
                window = batches[start : start + self.k]
                tokens = sum(self.tokens(rows) for rows in window)
                for rows in window:
                    loss = self.loss(rows, tokens)
                    loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.summary.add_scalar("train/loss", loss.item(), self.step)
                self.step += 1

    def eval(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                rows = torch.arange(len(IDS))
                return float(self.model(IDS, attention_mask=MASK, labels=self.labels(rows)).loss)
        finally:
            self.model.train(was_training)


class PerMicroBatchTokenMean(LanguageModelTrainer):
    """The 2024 transformers bug: each micro-batch's mean over its own tokens, divided by k."""

    def loss(self, rows: torch.Tensor, window_tokens: int) -> torch.Tensor:
        labels = self.labels(rows)
        output = self.model(input_ids=IDS[rows], attention_mask=MASK[rows], labels=labels)
        return output.loss / self.k


# -- compiled training: one bug each --------------------------------------------------------
class AnnealsDropout(StackTrainer):
    """Raises the dropout probability every epoch: a compiled model recompiles every epoch."""

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.dropout.p = 0.1 + 0.05 * self.step
            super().train(1)
