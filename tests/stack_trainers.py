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
import copy
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

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
    inputs, targets = INPUTS, TARGETS

    def make_model(self) -> nn.Module:
        return Net()

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
        self.model = self.make_model()
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
        order = torch.randperm(len(self.inputs), generator=self.generator)
        batches = list(order.split(self.micro_batch))
        for start in range(0, len(batches), self.k):
            yield batches[start : start + self.k]

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        with self.autocast():
            output = self.forward(self.inputs[batch])
        return F.cross_entropy(output.float(), self.targets[batch], reduction="sum") / count

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
                return F.cross_entropy(self.forward(self.inputs).float(), self.targets).item()
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
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
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


class ResetsTheTotalEveryEpoch(StackTrainer):
    """Sums the epoch's loss tensors into an attribute it resets every epoch: the graphs of a
    whole epoch stay alive."""

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.epoch_loss: Any = 0.0
            super().train(1)

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.epoch_loss = self.epoch_loss + loss


class KeepsLossesInALocalList(StackTrainer):
    """Collects the epoch's loss tensors in a local list, to log their mean at its end."""

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.train()
            losses = []
            for window in self.windows():
                for batch in window:
                    loss = self.loss(batch, sum(len(b) for b in window), len(window))
                    self.backward(loss)
                    losses.append(loss)
                self.optimizer_step()
            self.summary.add_scalar("train/loss", torch.stack(losses).mean().item(), self.step)
            self.step += 1


class KeepsTheEpochsTrainingOutputs(StackTrainer):
    """Keeps, for the epoch's training accuracy, the outputs of a second forward pass run
    outside torch.no_grad(), reset every epoch: backward never runs through these graphs, so
    each keeps its activations."""

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.epoch_outputs: List[torch.Tensor] = []
            super().train(1)

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.epoch_outputs.append(self.forward(INPUTS[:4]))


class KeepsTheLastLoss(StackTrainer):
    """Correct: keeps the last step's loss, whose graph is replaced every step."""

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        self.last_loss = loss


class CouplesTheBatch(StackTrainer):
    """Correct, but its loss couples the samples of a batch (a spread term over the batch):
    no accumulation reproduces it."""

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        output = self.forward(INPUTS[batch])
        spread = (output - output.mean(0)).pow(2).sum()
        return (F.cross_entropy(output, TARGETS[batch], reduction="sum") + spread) / count


class DrawsRandomIndices(StackTrainer):
    """Weighs one sample of each batch, drawn with torch.randint, twice: no expected value
    replaces that draw."""

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        losses = F.cross_entropy(self.forward(INPUTS[batch]), TARGETS[batch], reduction="none")
        chosen = torch.randint(0, len(batch), ())
        return (losses.sum() + losses[chosen]) / count


class KeepsTheBatchSize(StackTrainer):
    """Accumulates k batches of the full size: other samples per step than without."""

    def __init__(self, accumulation_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(accumulation_steps, **kwargs)
        self.micro_batch = self.batch_size


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


class FusedAdam(StackTrainer):
    """Correct: a fused optimizer, which GradScaler hands the scaled gradients and the scale."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05, fused=True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, 0.5)


class SaturatesInBfloat16(StackTrainer):
    """A hand-made log(1 - sigmoid) on the autocast output: 1 - sigmoid(x) rounds to 0 in
    bfloat16 where float32 still holds it."""

    def loss(self, batch: torch.Tensor, count: int, window: int) -> torch.Tensor:
        with self.autocast():
            output = self.forward(INPUTS[batch]) * 4 + 9
            return -torch.log(1 - torch.sigmoid(output)).sum() / count


class IgnoresThePrecision(StackTrainer):
    def autocast(self) -> Any:
        return contextlib.nullcontext()


class ScalesInFloat16(StackTrainer):
    """A GradScaler under float16 autocast, as mixed precision on a GPU trains."""

    def autocast(self) -> Any:
        if self.scaler is not None:
            return torch.autocast("cpu", dtype=torch.float16)
        return super().autocast()


class NeverUpdatesTheScaler(StackTrainer):
    def optimizer_step(self) -> None:
        if self.scaler is None:
            super().optimizer_step()
            return
        self.scaler.step(self.optimizer)
        self.optimizer.zero_grad()


# -- transformers-style loops: a language model on padded sequences ----------------------
#: 8 sequences of 3 to 8 tokens, right-padded to 8: micro-batches hold different token counts
LENGTHS = [8, 3, 6, 4, 7, 5, 8, 3]
_TOKENS = torch.Generator().manual_seed(1)
IDS = torch.randint(1, 50, (8, 8), generator=_TOKENS)
MASK = (torch.arange(8) < torch.tensor(LENGTHS).unsqueeze(1)).long()


class TinyLanguageModel(nn.Module):
    """Embeddings, dropout and a GRU: next-token logits; padding masked in the loss only."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.dropout = nn.Dropout(0.1)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.dropout(self.embedding(ids)))[0])


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50,
        n_positions=8,
        n_embd=16,
        n_layer=1,
        n_head=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


class LanguageModelTrainer:
    """Trains a language model as transformers' Trainer does since its 2024 fix: each
    micro-batch's loss is summed over its tokens and divided by the number of tokens in the
    whole window (num_items_in_batch). Batches of 4 sequences, k micro-batches each. The
    model: a small GRU (``gpt2`` false) or a tiny GPT-2 from transformers."""

    batch_size = 4
    gpt2 = False

    def __init__(
        self, accumulation_steps: int = 1, precision: str = "32", compile_backend: Any = None
    ) -> None:
        self.k = accumulation_steps
        self.micro_batch = self.batch_size // accumulation_steps
        self.precision = precision
        self.model = tiny_gpt2() if self.gpt2 else TinyLanguageModel()
        self.forward = (
            torch.compile(self.model, backend=compile_backend)
            if compile_backend is not None
            else self.model
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.summary = Writer()
        self.step = 0

    def labels(self, rows: torch.Tensor) -> torch.Tensor:
        return IDS[rows].masked_fill(MASK[rows] == 0, -100)

    def tokens(self, rows: torch.Tensor) -> int:
        return int((self.labels(rows)[:, 1:] != -100).sum())  # the shifted labels

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.gpt2:
                return self.forward(input_ids=IDS[rows], attention_mask=MASK[rows]).logits
            return self.forward(IDS[rows])

    def loss(self, rows: torch.Tensor, window_tokens: int) -> torch.Tensor:
        """The summed loss of the next tokens, divided by the window's count of them."""
        logits = self.logits(rows)[:, :-1].float()
        labels = self.labels(rows)[:, 1:]
        summed = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return summed / window_tokens

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
                return self.loss(rows, self.tokens(rows)).item()
        finally:
            self.model.train(was_training)


class PerMicroBatchTokenMean(LanguageModelTrainer):
    """The 2024 transformers bug: each micro-batch's mean over its own tokens, divided by k."""

    def loss(self, rows: torch.Tensor, window_tokens: int) -> torch.Tensor:
        return super().loss(rows, self.tokens(rows)) / self.k


class GPT2Trainer(LanguageModelTrainer):
    """The loop on a tiny GPT-2 of transformers, with the model's own loss
    (``labels=``, ``num_items_in_batch=``)."""

    gpt2 = True

    def loss(self, rows: torch.Tensor, window_tokens: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            output = self.forward(
                input_ids=IDS[rows],
                attention_mask=MASK[rows],
                labels=self.labels(rows),
                num_items_in_batch=window_tokens,
            )
        return output.loss


class GPT2PerMicroBatchMean(GPT2Trainer):
    def loss(self, rows: torch.Tensor, window_tokens: int) -> torch.Tensor:
        labels = self.labels(rows)
        output = self.model(input_ids=IDS[rows], attention_mask=MASK[rows], labels=labels)
        return output.loss / self.k


# -- compiled training: one bug each --------------------------------------------------------
class CompilesACopy(StackTrainer):
    """Compiles a copy of the model: the optimizer trains the original, the compiled copy
    that computes the losses never changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.forward is not self.model:
            backend = kwargs.get("compile_backend")
            self.forward = torch.compile(copy.deepcopy(self.model), backend=backend)


class IgnoresTheCompileBackend(StackTrainer):
    def __init__(self, *args: Any, compile_backend: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def cumulative_net() -> nn.Module:
    """Logits normalised by BatchNorm with a cumulative average (momentum=None), whose
    training forward reads num_batches_tracked into a Python float: torch.compile leaves
    the whole Sequential to eager PyTorch in training mode."""
    return nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4, momentum=None))


class TrainsWhatCompilesNothing(StackTrainer):
    """Correct: trains torch.compile(model, backend) as asked, evaluates the model as it is;
    torch.compile compiles no graph of this model in training mode."""

    def make_model(self) -> nn.Module:
        return cumulative_net()

    def eval(self) -> float:
        forward, self.forward = self.forward, self.model
        try:
            return super().eval()
        finally:
            self.forward = forward


class AnnealsDropout(StackTrainer):
    """Raises the dropout probability every epoch: a compiled model recompiles every epoch."""

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            self.model.dropout.p = 0.1 + 0.05 * self.step
            super().train(1)


# -- third-party models in the classifier loop -----------------------------------------------
_IMAGES = torch.Generator().manual_seed(2)


class ThirdPartyTrainer(StackTrainer):
    """The classifier loop on a model of timm, torchvision or transformers (``factory``)."""

    factory: Any = None
    inputs = torch.randn(10, 3, 32, 32, generator=_IMAGES)
    targets = torch.arange(10) % 4

    def make_model(self) -> nn.Module:
        return self.factory()


def third_party_trainers() -> Dict[str, type]:
    """A trainer class for each model: BatchNorm, stochastic depth, squeeze-excitation,
    dropout, attention; ``{}`` without the zoo extra."""
    try:
        import timm
        import torchvision
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        return {}

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=8,
                num_labels=4,
            )
            self.bert = BertForSequenceClassification(config)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=(ids != 0).long()).logits

    def vision_transformer() -> nn.Module:
        return torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            dropout=0.1,
            num_classes=4,
        )

    factories: Dict[str, Tuple[Any, Optional[torch.Tensor]]] = {
        "timm test_resnet (BatchNorm)": (
            lambda: timm.create_model("test_resnet", num_classes=4),
            None,
        ),
        "timm test_efficientnet (BatchNorm, drop path)": (
            lambda: timm.create_model("test_efficientnet", num_classes=4, drop_path_rate=0.2),
            None,
        ),
        "timm test_vit (drop path)": (
            lambda: timm.create_model(
                "test_vit", num_classes=4, img_size=32, drop_path_rate=0.1, drop_rate=0.1
            ),
            None,
        ),
        "torchvision VisionTransformer (dropout)": (vision_transformer, None),
        "transformers BERT (dropout, padding)": (
            Bert,
            IDS.masked_fill(MASK == 0, 0)[[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]],
        ),
    }
    return {
        name: type(
            name,
            (ThirdPartyTrainer,),
            {"factory": staticmethod(factory), **({} if inputs is None else {"inputs": inputs})},
        )
        for name, (factory, inputs) in factories.items()
    }
