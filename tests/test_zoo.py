"""The model checks on correct, widely used third-party models: no false alarm, no needless skip.

timm and torchvision vision models, Hugging Face transformers (BERT, RoBERTa, DistilBERT, GPT-2,
Llama, T5, ViT: dict inputs, attention masks, ``ModelOutput``), a PEFT LoRA adapter and PyTorch's
own sequence layers, all built offline from
small configurations with random weights. Every check must pass; the only skips allowed are
the ones each case lists (no GPU here, no padding mask for a model without one, ...).

Needs the ``zoo`` extra (``pip install -e ".[zoo]"``, part of ``dev``); skips without it.
"""

from __future__ import annotations

import importlib.util
import unittest
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from checkrunner import NO_GPU, NO_RUNNING_STATISTICS, CheckTestCase, make_case
from torch import nn

from dltestkit import DistributedModelTests, ModelTests, SequenceModelTests
from dltestkit.core.contract import checks_of
from dltestkit.core.paths import map_tensors

MISSING = [
    name
    for name in ("timm", "torchvision", "transformers", "peft")
    if importlib.util.find_spec(name) is None
]
BATCH, LENGTH, VOCAB = 4, 8, 100

NO_MAKE_MODEL = "self.make_model is not set"
NOT_CAUSAL = "self.causal is False"
NO_MASK = "self.padding_mask is not set"


def has_running_statistics(model: nn.Module) -> bool:
    """Whether a model has buffers of running statistics (BatchNorm's): on the others,
    test_running_statistics may skip, having nothing to check."""
    return any(name.endswith("running_mean") for name, _ in model.named_buffers())


def differs_in_training(path: str) -> str:
    """test_train_matches_eval on a model that computes differently in training by design."""
    return f"{path} differs between training and eval mode ("


def token_batch(left_padding: bool = False) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if left_padding:
        mask[0, :3] = 0
        mask[1, :1] = 0
    else:
        mask[0, -3:] = 0
        mask[1, -1:] = 0
    return {
        "input_ids": torch.randint(1, VOCAB, (BATCH, LENGTH), generator=generator),
        "attention_mask": mask,
    }


def tokenizer_padded(pad_token_id: int) -> Dict[str, torch.Tensor]:
    """Right padding as a tokenizer makes it: the pad token at the padded positions."""
    batch = token_batch()
    ids = batch["input_ids"].clamp(min=2)
    return {**batch, "input_ids": ids.masked_fill(batch["attention_mask"] == 0, pad_token_id)}


def labels_only() -> Dict[str, torch.Tensor]:
    """An encoder-decoder called for training with labels only: the model shifts them right
    into its decoder inputs (a new tensor), so the output at t depends on labels before t."""
    generator = torch.Generator().manual_seed(2)
    return {**token_batch(), "labels": torch.randint(2, VOCAB, (BATCH, 6), generator=generator)}


def with_position_ids(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Position ids counted from each sample's first real token, as transformers' generate
    computes them for left-padded batches (without them a decoder counts from column 0)."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return {**batch, "position_ids": positions}


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32)


# -- the models --------------------------------------------------------------------------
def bert_config(**options: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **options,
    )


def gpt2_config(**options: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, **options)


def t5_config() -> Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def bert() -> nn.Module:
    from transformers import BertModel

    return BertModel(bert_config())


def bert_checkpointed() -> nn.Module:
    """Reentrant gradient checkpointing in training mode, the path PEFT's k-bit training
    falls back to."""
    model = bert()
    reentrant = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
    return model


def gpt2() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(bos_token_id=0, eos_token_id=0))


def t5() -> nn.Module:
    from transformers import T5Model

    return T5Model(t5_config())


def t5_lm() -> nn.Module:
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration(t5_config())


def roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(
        RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=66,
            pad_token_id=1,
        )
    )


def distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(
        DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
        )
    )


def gpt2_classifier() -> nn.Module:
    """Pools the last real token, which it finds from the pad token."""
    from transformers import GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(
        gpt2_config(bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=3)
    )


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


#: The sizes of the zoos' tiny vision transformers of transformers (ViT, DINOv2, ViTMAE, CLIP's
#: vision tower): 32 x 32 images in 16 patches, 2 layers of width 32.
TINY_VIT: Dict[str, int] = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**TINY_VIT))


def lora_bert() -> nn.Module:
    import peft

    return peft.get_peft_model(bert(), peft.LoraConfig(r=4, target_modules=["query", "value"]))


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def torchvision_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10, zero_init_residual=True)


def torchvision_vit() -> nn.Module:
    """Its classification head starts at exactly zero, so its output starts constant."""
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def nested_encoder() -> nn.Module:
    """With its default enable_nested_tensor=True: it asks whether the mask is left-aligned."""
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)


class LSTMTagger(nn.Module):
    """Token ids -> per-token scores through an embedding and an LSTM (returns a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        hidden, state = self.lstm(self.embed(ids))
        return self.head(hidden), state


class PackedLSTMTagger(nn.Module):
    """The same over padding, the standard way: packed with the lengths on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(input_ids), attention_mask.sum(1).cpu(), True, enforce_sorted=False
        )
        hidden, _ = nn.utils.rnn.pad_packed_sequence(
            self.lstm(packed)[0], batch_first=True, total_length=input_ids.shape[1]
        )
        return self.head(hidden)


# label: (mixin, setUp attributes, allowed skips); "model"/"inputs" are built per test.
ZOO: Dict[str, Tuple[type, Dict[str, Any], Tuple[str, ...]]] = {
    "timm resnet18 (default arguments)": (
        ModelTests,
        dict(
            model=timm_model("resnet18"),
            inputs=images,
            expected_output_shape=(BATCH, 1000),
            make_model=timm_model("resnet18"),
        ),
        (),
    ),
    "timm ViT": (
        ModelTests,
        dict(
            model=timm_model(
                "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
            ),
            inputs=images,
            expected_output_shape=(BATCH, 10),
        ),
        (NO_MAKE_MODEL,),
    ),
    "timm ConvNeXt": (
        ModelTests,
        dict(
            model=timm_model(
                "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=10
            ),
            inputs=images,
            expected_output_shape=(BATCH, 10),
        ),
        (NO_MAKE_MODEL,),
    ),
    "torchvision resnet18, zero_init_residual": (
        ModelTests,
        dict(
            model=torchvision_resnet18,
            inputs=images,
            expected_output_shape=(BATCH, 10),
            make_model=torchvision_resnet18,
        ),
        (),
    ),
    "torchvision ViT, zero-initialised head": (
        ModelTests,
        dict(
            model=torchvision_vit,
            inputs=images,
            expected_output_shape=(BATCH, 10),
            make_model=torchvision_vit,
        ),
        (),
    ),
    "transformers ViT, dict inputs": (
        ModelTests,
        dict(
            model=hf_vit,
            inputs=lambda: {"pixel_values": images()},
            expected_output_shape=(BATCH, 17, 32),
            make_model=hf_vit,
        ),
        (),
    ),
    "transformers BERT, padding mask": (
        SequenceModelTests,
        dict(
            model=bert,
            inputs=token_batch,
            output_key="last_hidden_state",
            expected_output_shape=(BATCH, LENGTH, 32),
            make_model=bert,
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NOT_CAUSAL,),
    ),
    "transformers BERT, reentrant gradient checkpointing": (
        SequenceModelTests,
        dict(
            model=bert_checkpointed,
            inputs=token_batch,
            output_key="last_hidden_state",
            expected_output_shape=(BATCH, LENGTH, 32),
            make_model=bert_checkpointed,
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NOT_CAUSAL,),
    ),
    "PEFT LoRA on BERT": (
        SequenceModelTests,
        dict(
            model=lora_bert,
            inputs=token_batch,
            expected_output_shape=(BATCH, LENGTH, 32),
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NO_MAKE_MODEL, NOT_CAUSAL),
    ),
    "transformers GPT-2, causal LM, left padding, position_ids": (
        SequenceModelTests,
        dict(
            model=gpt2,
            inputs=lambda: with_position_ids(token_batch(left_padding=True)),
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=gpt2,
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        ),
        (),
    ),
    "transformers Llama, causal LM, left padding, position_ids": (
        SequenceModelTests,
        dict(
            model=llama,
            inputs=lambda: with_position_ids(token_batch(left_padding=True)),
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=llama,
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        ),
        (),
    ),
    "transformers GPT-2, called with labels (float32 loss)": (
        ModelTests,
        dict(
            model=gpt2,
            inputs=lambda: {**token_batch(), "labels": token_batch()["input_ids"]},
            output_key="logits",
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=gpt2,
        ),
        (),
    ),
    "transformers Llama, called with labels (float32 loss)": (
        ModelTests,
        dict(
            model=llama,
            inputs=lambda: {**token_batch(), "labels": token_batch()["input_ids"]},
            output_key="logits",
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=llama,
        ),
        (),
    ),
    "transformers Llama, causal LM, left padding, rotary positions from column 0": (
        SequenceModelTests,
        dict(
            model=llama,
            inputs=lambda: token_batch(left_padding=True),  # rotary: shift-invariant
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        ),
        (NO_MAKE_MODEL,),
    ),
    "transformers RoBERTa, tokenizer padding": (
        SequenceModelTests,
        dict(
            model=roberta,
            inputs=lambda: tokenizer_padded(1),
            output_key="last_hidden_state",
            expected_output_shape=(BATCH, LENGTH, 32),
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NO_MAKE_MODEL, NOT_CAUSAL),
    ),
    "transformers DistilBERT, padding mask": (
        SequenceModelTests,
        dict(
            model=distilbert,
            inputs=token_batch,
            expected_output_shape=(BATCH, LENGTH, 32),
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NO_MAKE_MODEL, NOT_CAUSAL),
    ),
    "transformers GPT-2 classifier, padding made by the check": (
        SequenceModelTests,
        dict(
            model=gpt2_classifier,
            inputs=lambda: {
                "input_ids": token_batch()["input_ids"],
                "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
            },
            expected_output_shape=(BATCH, 3),
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NO_MAKE_MODEL, NOT_CAUSAL),
    ),
    "transformers T5, encoder padding": (
        SequenceModelTests,
        dict(
            model=t5,
            inputs=lambda: {
                **token_batch(),
                "decoder_input_ids": token_batch()["input_ids"][:, :5],
            },
            output_key="encoder_last_hidden_state",
            expected_output_shape=(BATCH, LENGTH, 32),
            sequence_dim=1,
            padding_mask="attention_mask",
            sequence_inputs=["input_ids"],
        ),
        (NO_MAKE_MODEL, NOT_CAUSAL),
    ),
    "transformers T5, labels only": (
        SequenceModelTests,
        dict(
            model=t5_lm,
            inputs=labels_only,
            output_key="logits",
            expected_output_shape=(BATCH, 6, VOCAB),
            make_model=t5_lm,
            sequence_dim=1,
            causal=True,
            sees_present=False,
            sequence_inputs=["labels"],
        ),
        (NO_MASK,),
    ),
    "transformers T5, encoder-decoder": (
        SequenceModelTests,
        dict(
            model=t5,
            inputs=lambda: {
                **token_batch(),
                "decoder_input_ids": token_batch()["input_ids"].flip(1),
            },
            expected_output_shape=(BATCH, LENGTH, 32),
            make_model=t5,
            sequence_dim=1,
            causal=True,
            sequence_inputs=["decoder_input_ids"],
        ),
        (NO_MASK,),
    ),
    "nn.LSTM tagger": (
        SequenceModelTests,
        dict(
            model=LSTMTagger,
            inputs=lambda: torch.randint(0, VOCAB, (BATCH, LENGTH)),
            expected_output_shape=(BATCH, LENGTH, 5),
            make_model=LSTMTagger,
            sequence_dim=1,
            causal=True,
        ),
        (NO_MASK,),
    ),
    "nn.LSTM packed with CPU lengths, padding mask": (
        SequenceModelTests,
        dict(
            model=PackedLSTMTagger,
            inputs=token_batch,
            expected_output_shape=(BATCH, LENGTH, 5),
            make_model=PackedLSTMTagger,
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (NOT_CAUSAL,),
    ),
    "nn.GRU": (
        SequenceModelTests,
        dict(
            model=lambda: nn.GRU(3, 5, num_layers=2, batch_first=True),
            inputs=lambda: torch.randn(BATCH, LENGTH, 3),
            expected_output_shape=(BATCH, LENGTH, 5),
            sequence_dim=1,
            causal=True,
        ),
        (NO_MAKE_MODEL, NO_MASK),
    ),
    "nn.TransformerEncoder, key padding mask": (
        SequenceModelTests,
        dict(
            model=encoder,
            inputs=lambda: {
                "src": torch.randn(BATCH, LENGTH, 16),
                "src_key_padding_mask": token_batch()["attention_mask"] == 0,
            },
            expected_output_shape=(BATCH, LENGTH, 16),
            sequence_dim=1,
            padding_mask="src_key_padding_mask",
            padded_value=True,
        ),
        (NO_MAKE_MODEL, NOT_CAUSAL),
    ),
    "nn.TransformerEncoder, nested tensors (default), key padding mask": (
        SequenceModelTests,
        dict(
            model=nested_encoder,
            inputs=lambda: {
                "src": torch.randn(BATCH, LENGTH, 16),
                "src_key_padding_mask": token_batch()["attention_mask"] == 0,
            },
            expected_output_shape=(BATCH, LENGTH, 16),
            make_model=nested_encoder,
            sequence_dim=1,
            padding_mask="src_key_padding_mask",
            padded_value=True,
        ),
        (NOT_CAUSAL,),
    ),
    "nn.TransformerEncoder, causal mask": (
        SequenceModelTests,
        dict(
            model=encoder,
            inputs=lambda: {
                "src": torch.randn(BATCH, LENGTH, 16),
                "mask": nn.Transformer.generate_square_subsequent_mask(LENGTH),
                "is_causal": True,
            },
            unbatched_inputs=["mask"],
            expected_output_shape=(BATCH, LENGTH, 16),
            sequence_dim=1,
            causal=True,
        ),
        (NO_MAKE_MODEL, NO_MASK),
    ),
    "nn.TransformerDecoderLayer, masks": (
        SequenceModelTests,
        dict(
            model=lambda: nn.TransformerDecoderLayer(16, 2, 32, batch_first=True),
            inputs=lambda: {
                "tgt": torch.randn(BATCH, LENGTH, 16),
                "memory": torch.randn(BATCH, 5, 16),
                "tgt_mask": torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1),
                "tgt_is_causal": True,
                "tgt_key_padding_mask": token_batch()["attention_mask"] == 0,
            },
            unbatched_inputs=["tgt_mask"],
            expected_output_shape=(BATCH, LENGTH, 16),
            sequence_dim=1,
            causal=True,
            sequence_inputs=["tgt"],
            padding_mask="tgt_key_padding_mask",
            padded_value=True,
        ),
        (NO_MAKE_MODEL,),
    ),
}


#: The attributes of a zoo case the distributed model checks read.
DISTRIBUTED = ("model", "inputs", "unbatched_inputs", "loss_fn")


def zoo_case(mixin: type, attributes: Dict[str, Any]) -> type:
    def set_up(self: Any) -> None:
        for name, value in attributes.items():
            setattr(self, name, value() if name in ("model", "inputs") else value)

    return make_case(mixin, set_up)


@unittest.skipIf(MISSING, f"needs {', '.join(MISSING)}: pip install -e '.[zoo]'")
class RealModels(CheckTestCase):
    def setUp(self) -> None:
        import transformers

        transformers.logging.set_verbosity_error()

    # the zoo in two halves, which pytest -n 2 runs side by side: every other model, so that
    # the two ResNets, which take most of the time, fall one in each
    def test_every_check_passes_on_the_even_numbered_models(self) -> None:
        self._every_check_passes(list(ZOO)[0::2])

    def test_every_check_passes_on_the_odd_numbered_models(self) -> None:
        self._every_check_passes(list(ZOO)[1::2])

    def _every_check_passes(self, labels: List[str]) -> None:
        for label in labels:
            mixin, attributes, skips = ZOO[label]
            case = zoo_case(mixin, attributes)
            allowed = [NO_GPU, *skips]
            if not has_running_statistics(attributes["model"]()):
                allowed.append(NO_RUNNING_STATISTICS)
            for name in checks_of(case):
                with self.subTest(label, check=name):
                    self.assertPasses(case, name, allowed_skips=allowed)

    def test_the_gpu_comparison_passes_on_every_model_with_the_cpu_standing_in(self) -> None:
        # BatchNorm (ResNet) and transformers' cache objects (GPT-2, Llama) included
        for label, (mixin, attributes, _) in ZOO.items():
            with self.subTest(label):
                case = zoo_case(mixin, dict(attributes, accelerators=["cpu"]))
                self.assertPasses(case, "test_device_moving_on_gpu", allowed_skips=())

    def assertDataParallelPasses(self, check: str) -> None:
        """``check`` of DistributedModelTests on every model, BatchNorm's per-rank statistics
        declared (the ResNets)."""
        for label, (_, attributes, _) in ZOO.items():
            kept = {key: value for key, value in attributes.items() if key in DISTRIBUTED}
            case = zoo_case(DistributedModelTests, dict(kept, local_batch_statistics=["*"]))
            with self.subTest(label):
                self.assertPasses(case, check, allowed_skips=())

    @pytest.mark.slow
    def test_ddp_gradients_pass_on_every_model(self) -> None:
        # the ranks' weights compared too: no model of the zoo changes them per rank
        self.assertDataParallelPasses("test_ddp_gradients")

    @pytest.mark.slow
    def test_fsdp_gradients_pass_on_every_model(self) -> None:
        self.assertDataParallelPasses("test_fsdp_gradients")

    @pytest.mark.slow
    def test_fsdp_gradients_pass_under_a_bfloat16_policy(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for label, (_, attributes, _) in ZOO.items():
            if not label.startswith(("transformers", "timm ViT", "nn.")):
                continue
            kept = {key: value for key, value in attributes.items() if key in DISTRIBUTED}
            case = zoo_case(DistributedModelTests, dict(kept, fsdp_mixed_precision=policy))
            with self.subTest(label):
                self.assertPasses(case, "test_fsdp_gradients", allowed_skips=())

    def test_padding_invariance_passes_in_bfloat16(self) -> None:
        # the same computation at another length rounds otherwise: in bfloat16 that reached
        # 6e-4 on logits near zero, far above assert_close's default atol of 1e-5
        labels = [
            "transformers GPT-2, causal LM, left padding, position_ids",
            "transformers Llama, causal LM, left padding, position_ids",
            "transformers Llama, causal LM, left padding, rotary positions from column 0",
            "transformers T5, encoder padding",
        ]
        for label in labels:
            mixin, attributes, _ = ZOO[label]
            model, inputs = attributes["model"], attributes["inputs"]
            halved = dict(attributes, model=lambda model=model: model().to(torch.bfloat16))
            halved["inputs"] = lambda inputs=inputs: map_tensors(
                lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, inputs()
            )
            with self.subTest(label):
                self.assertPasses(zoo_case(mixin, halved), "test_padding_invariance")

    def test_a_mask_token_used_only_with_a_pretraining_mask_is_named_with_that_cause(
        self,
    ) -> None:
        # DINOv2 holds a mask token that only a bool_masked_pos input uses: without it, no
        # gradient (and DDP without find_unused_parameters stops); named, and allowed by name
        from transformers import Dinov2Config, Dinov2Model

        def dinov2() -> nn.Module:
            return Dinov2Model(Dinov2Config(**TINY_VIT))

        attributes = dict(
            model=dinov2,
            inputs=lambda: {"pixel_values": torch.rand(4, 3, 32, 32)},
            output_key="last_hidden_state",
        )
        self.assertFailsWith(
            zoo_case(ModelTests, attributes),
            "test_all_parameters_updated",
            "embeddings.mask_token: no gradient in 3 step(s): dead, not connected to the loss "
            "(unused in forward, or used only with an input that self.inputs leaves out, as a "
            "mask token with a pretraining mask;",
        )
        allowed = dict(attributes, allowed_unchanged_parameters=["embeddings.mask_token"])
        self.assertPasses(zoo_case(ModelTests, allowed), "test_all_parameters_updated")

    def test_token_ids_no_probe_follows_are_compared_by_value(self) -> None:
        attributes = dict(model=ClampsItsIds, inputs=lambda: token_batch(left_padding=True))
        self.assertPasses(zoo_case(ModelTests, attributes), "test_batch_independence")


class ClampsItsIds(nn.Module):
    """A correct GPT-2 wrapper that clamps its token ids: a new tensor, which no embedding
    probe can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = gpt2()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        ids = input_ids.clamp(0, VOCAB - 1)
        return self.gpt2(input_ids=ids, attention_mask=attention_mask).logits


class DropsTheMask(nn.Module):
    """A wrapper that accepts an attention mask and forgets to pass it on."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = bert()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.bert(input_ids=input_ids).last_hidden_state


class PositionIdsOnTheCPU(nn.Module):
    """A wrapper that passes position ids made without device=."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = gpt2()

    def forward(self, input_ids: torch.Tensor) -> Any:
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        return self.gpt2(input_ids=input_ids, position_ids=positions).logits


class NextTokenFirst(nn.Module):
    """A GPT-2 wrapper that shifts the ids the wrong way: position t is fed token t + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = gpt2()

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.gpt2(input_ids=torch.roll(input_ids, -1, dims=1), **kwargs).logits


class MeanOverThePaddedLength(nn.Module):
    """A BERT sentence encoder that zeroes the padding, then divides by the padded length."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = bert()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        hidden = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state
        return (hidden * attention_mask[..., None]).mean(1)  # not .sum(1) / mask.sum(1)


@unittest.skipIf(MISSING, f"needs {', '.join(MISSING)}: pip install -e '.[zoo]'")
class RealModelBugs(CheckTestCase):
    """The same models with one bug each: caught, with the message naming it."""

    def setUp(self) -> None:
        import transformers

        transformers.logging.set_verbosity_error()

    def test_bert_declared_causal_fails_causality(self) -> None:
        attributes = dict(ZOO["transformers BERT, padding mask"][1], causal=True)
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_causality",
            "the output at position 0 depends on self.inputs['input_ids'] "
            "(through its embedding) at position 1",
        )

    def test_an_attention_mask_that_is_dropped_fails_padding_invariance(self) -> None:
        attributes = dict(
            model=DropsTheMask, inputs=token_batch, sequence_dim=1, padding_mask="attention_mask"
        )
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_padding_invariance",
            "sample 0: its output at real "
            "position 0 depends on self.inputs['input_ids'] (through its "
            "embedding) at padded positions [5, 6, 7]",
        )

    def test_gpt2_left_padded_without_position_ids_fails_padding_invariance(self) -> None:
        attributes = dict(
            ZOO["transformers GPT-2, causal LM, left padding, position_ids"][1],
            inputs=lambda: token_batch(left_padding=True),
        )
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_padding_invariance",
            "sample 0: its outputs at its real positions [3, 4, 5, 6, 7] change with the "
            "padding: run alone without its padding (5 positions, a batch of 1, the mask all "
            "real) it gives other outputs",
            "Pass position_ids computed from the mask (attention_mask.cumsum(-1) - 1, as "
            "transformers' generate does), or pad on the right.",
        )

    def test_token_ids_shifted_the_wrong_way_fail_causality(self) -> None:
        attributes = dict(
            model=NextTokenFirst,
            inputs=lambda: with_position_ids(token_batch(left_padding=True)),
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        )
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_causality",
            "changes when self.inputs['input_ids'] at position 1, a later position, is "
            "replaced by other ids of the batch: the model sees the future",
            "torch.roll(ids, -1, dims=1)",
        )

    def test_a_mean_over_the_padded_length_fails_padding_invariance(self) -> None:
        attributes = dict(
            model=MeanOverThePaddedLength,
            inputs=token_batch,
            sequence_dim=1,
            padding_mask="attention_mask",
        )
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_padding_invariance",
            "sample 0: its output changes with the padding: run alone without its padding",
            "(h * mask).mean(1) instead of (h * mask).sum(1) / mask.sum(1)",
        )

    def test_t5_called_with_labels_only_sees_the_labels_before_each_position(self) -> None:
        attributes = dict(ZOO["transformers T5, labels only"][1], sees_present=True)
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_causality",
            "the output at position 1 does not depend on self.inputs['labels'] at position 1",
            "a transformers encoder-decoder called with labels only), set "
            "self.sees_present = False",
        )

    def test_labels_in_the_inputs_without_output_key_fail_with_a_hint(self) -> None:
        def classifier() -> nn.Module:
            from transformers import BertForSequenceClassification

            return BertForSequenceClassification(bert_config(num_labels=3))

        attributes = dict(
            model=classifier,
            inputs=lambda: {**token_batch(), "labels": torch.tensor([0, 1, 2, 1])},
            sequence_dim=1,
            padding_mask="attention_mask",
        )
        self.assertFailsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_padding_invariance",
            "the checked output has shape (), whose first dimension is not the batch size 4",
            "output.loss (), output.logits (4, 3)); set self.output_key to check another",
        )

    def test_prompt_tuning_is_refused_by_padding_invariance(self) -> None:
        def prompt_tuned() -> nn.Module:
            import peft

            return peft.get_peft_model(
                gpt2(), peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
            )

        attributes = dict(
            model=prompt_tuned, inputs=token_batch, sequence_dim=1, padding_mask="attention_mask"
        )
        self.assertErrorsWith(
            zoo_case(SequenceModelTests, attributes),
            "test_padding_invariance",
            "the checked output has 12 positions at sequence_dim=1, more than the 8 of the "
            "padding mask self.inputs['attention_mask']: the model adds positions of its own",
        )

    def test_position_ids_made_on_the_cpu_fail_device_moving(self) -> None:
        attributes = dict(model=PositionIdsOnTheCPU, inputs=lambda: token_batch()["input_ids"])
        self.assertFailsWith(
            zoo_case(ModelTests, attributes),
            "test_device_moving",
            "F.embedding combines a CPU tensor of shape (1, 8) (torch.int64)",
            "in gpt2.transformer.wpe (Embedding)",
        )


if __name__ == "__main__":
    unittest.main()
