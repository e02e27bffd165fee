"""The model checks on correct-by-design components of every family a check could misjudge.

Issue 20's zoo: models that are correct although they do what a check looks for in a bug. A
VAE that samples at evaluation (PyTorch's ``examples/vae``), contrastive models whose logits
compare every sample with every other (CLIP), mixtures of experts (Mixtral, Qwen2-MoE, a
hand-written top-k layer), state-space models (Mamba, Mamba2), RWKV, Reformer (reversible
layers whose backward pass runs in training mode only), segmentation models,
audio encoders (wav2vec2, WavLM, HuBERT, Whisper), encoder-decoders (BART, Whisper, LongT5),
vision models with stochastic depth (timm Swin, EfficientNet, ConvNeXt, ViT; torchvision
MobileNetV3, EfficientNet), BatchNorm (also under gradient checkpointing: a memory-efficient
DenseNet), PEFT adapters, a diffusion UNet (and diffusers' conditional UNet), ViTMAE (random
masking in every mode), a GAN generator and a spectral-norm discriminator, a Gumbel-softmax
bottleneck, a policy that samples its actions, quantisation-aware training, weight tying, a
frozen backbone under ``torch.no_grad()``, sparse embeddings, an STFT front end, FNet (FFT
mixing), logits upcast to float32, a tabular model and a LightningModule.

Each setUp is what a user following docs/models.md, docs/sequence-models.md and
docs/howto-real-models.md writes; every model is built offline from a small configuration
with random weights. Every default check must pass on each one; the only skips allowed are
the ones each case lists. Each false alarm of the issue, and each one found here, also has
a test of its own (``DesignFalseAlarms``). torchvision's detection models, which take a list
of images and a list of target dicts, are a separate group (``DETECTION``).

The extended part adds ``ARCHITECTURES``: some forty more transformers, timm and torchvision
architectures, built by their libraries from small configurations.

Run it on several seeds with ``python tests/test_zoo_design.py --seeds 0 1 2`` (each seed
is a pytest run with ``DLTESTKIT_TEST_SEED`` set, which tests/checkrunner.py reads); add
``--extended`` (or set ``DLTESTKIT_ZOO_EXTENDED=1``) for the slower part: more components
(``EXTENDED``) and the GPU comparison with the CPU standing in for a GPU.

Needs the ``zoo`` extra (``pip install -e ".[zoo]"``, part of ``dev``); skips without it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import unittest
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from checkrunner import (
    NO_GPU,
    NO_RUNNING_STATISTICS,
    CheckTestCase,
    built_under_seed,
    example_project_module,
    make_case,
)
from test_zoo import (
    BATCH,
    LENGTH,
    MISSING,
    NO_MAKE_MODEL,
    NO_MASK,
    NOT_CAUSAL,
    TINY_VIT,
    VOCAB,
    bert_config,
    differs_in_training,
    gpt2,
    gpt2_config,
    has_running_statistics,
    images,
    token_batch,
    with_position_ids,
)
from torch import nn

from dltestkit import DistributedModelTests, ModelTests, SequenceModelTests
from dltestkit.core.contract import checks_of

NEEDS = f"needs {', '.join(MISSING)}: pip install -e '.[zoo]'"
#: test_batch_independence on a model whose eval-mode outputs change from call to call.
CHANGES_BETWEEN_CALLS = "two eval-mode passes over self.inputs give different outputs"
#: test_batch_independence on a checked output that is a similarity matrix.
PAIRWISE = "the checked output, of shape (4, 4), compares pairs of samples"
#: test_dtype_moving's float64 subtest: transformers' MoE experts use torch._grouped_mm, which
#: has no float64 kernel.
GROUPED_MM = "torch._grouped_mm in model.layers.0.mlp.experts"
#: test_train_matches_eval on transformers' audio encoders: SpecAugment draws its masks from
#: NumPy's generator in training only, LayerDrop compares torch.rand with its rate.
SPEC_AUGMENT = differs_in_training("output.last_hidden_state")
#: test_device_moving on a model that makes a tensor with device=None when its weights are on
#: meta (LongT5's relative positions): its own choice, which a GPU does not see.
DEVICE_CHOSEN_FOR_META = "in eval and training mode, F.embedding combines a CPU tensor"
#: test_all_parameters_updated on a model whose attention runs over a single position at the
#: size of its inputs (softmax over one element): query, key and attention biases get none.
ONE_POSITION = "exactly zero gradients at the size of self.inputs"
#: test_all_parameters_updated on a model whose computation cancels at the size of its inputs
#: (PoolFormer's pooling minus its input, over a single position) but not on larger images.
CANCELS_AT_THIS_SIZE = "exactly zero gradients at the size of self.inputs (images of"
#: The gradient parts of the dependence checks on a model whose eval-mode pass cannot be
#: differentiated (RWKV updates its state in place): judged by values, a skipped part says so.
GRADIENTS_REFUSED = "no gradient can be taken through the model's eval-mode forward pass"
#: test_running_statistics on a model whose train() keeps every BatchNorm in eval mode.
FROZEN_NORMALISATION = "every normalisation layer with running statistics is frozen by design"


def samples_at_evaluation(output: str) -> str:
    """test_eval_deterministic on a model that samples ``output`` in eval mode by design."""
    return f"{output} changes with the random seed in eval mode"


# -- sharing a model across the checks ----------------------------------------------------
_BUILT: Dict[Callable[[], nn.Module], nn.Module] = {}


def shared(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build``, called once per process: the checks copy the model before they train,
    move or convert it and restore every submodule's mode, so the model a setUp builds can
    serve every check (the test_every_check_passes_on_every_component_* tests verify that its
    state dict is unchanged). Models with state that changes in eval mode are not shared."""

    def get() -> nn.Module:
        if build not in _BUILT:  # (first asked for in a setUp, or in a test's body)
            _BUILT[build] = built_under_seed(build)
        return _BUILT[build]

    get.__name__ = f"shared({getattr(build, '__name__', 'build')})"
    return get


# -- variational autoencoders ---------------------------------------------------------------
class ExamplesVAE(nn.Module):
    """PyTorch's examples/vae, as written there: ``reparameterize`` samples
    ``mu + eps * std`` with ``torch.randn_like`` in both modes; returns (recon, mu, logvar)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def example_project_model() -> Any:
    """example_project/model.py, loaded by path (its module name, ``model``, is too common)."""
    return example_project_module("model")


def mlp_vae() -> nn.Module:
    module: nn.Module = example_project_model().MLPVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
    return module


def cnn_vae() -> nn.Module:
    module: nn.Module = example_project_model().CNNVAE(input_shape=(1, 32, 32), bottleneck_dim=16)
    return module


# -- contrastive --------------------------------------------------------------------------
def clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(**TINY_VIT)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    return CLIPModel(config)


def clip_inputs() -> Dict[str, torch.Tensor]:
    """What CLIPProcessor returns for 4 captions and 4 images."""
    return {**token_batch(), "pixel_values": images()}


# -- mixtures of experts --------------------------------------------------------------------
def mixtral(**options: Any) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **options,
        )
    )


def mixtral_router_logits() -> nn.Module:
    """Trained as the model card says: the router logits give the load-balancing loss."""
    return mixtral(output_router_logits=True)


def qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


class TopKMoE(nn.Module):
    """A sparse mixture-of-experts layer without capacity (Mixtral's routing): each token goes
    to its top 2 of 4 expert MLPs, weighted by the renormalised router probabilities; returns
    the residual output and the Switch load-balancing loss of the batch."""

    def __init__(self, dim: int = 16, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim)) for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        probabilities = self.router(tokens).softmax(-1)
        weights, chosen = probabilities.topk(self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == index)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        share = F.one_hot(chosen[:, 0], len(self.experts)).to(x.dtype).mean(0)
        balance = len(self.experts) * (share * probabilities.mean(0)).sum()
        return x + out.reshape(x.shape), balance


# -- state-space models ---------------------------------------------------------------------
def mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(
        MambaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def rwkv() -> nn.Module:
    """RWKV: at evaluation it updates its recurrent state in place, so no gradient can be
    taken through an eval-mode pass."""
    from transformers import RwkvConfig, RwkvForCausalLM

    return RwkvForCausalLM(
        RwkvConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=64,
            context_length=64,
        )
    )


def mamba2() -> nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            num_heads=4,
            head_dim=16,
            n_groups=1,
            chunk_size=8,
            conv_kernel=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


# -- segmentation and detection ---------------------------------------------------------------
def lraspp() -> nn.Module:
    import torchvision

    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5
    )


def deeplabv3() -> nn.Module:
    import torchvision

    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5
    )


def faster_rcnn() -> nn.Module:
    import torchvision

    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
    )  # images kept at their size (at most 64), not resized to 320


def detection_batch() -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """The call of torchvision's detection references: ``model(images, targets)``, a list
    of images (of different sizes) and a list of target dicts (boxes, per-box labels)."""
    generator = torch.Generator().manual_seed(3)
    sizes = [(64, 64), (48, 64), (64, 56), (56, 48)]
    pictures = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 12.0, 44.0, 46.0]]),
            "labels": torch.tensor([1, 2]),
        }
        for _ in sizes
    ]
    return pictures, targets


# -- audio ----------------------------------------------------------------------------------
AUDIO_FRAMES = 78  # frames of 1600 samples after the convolutions below


def audio_config(config_class: Any) -> Any:
    return config_class(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )


def wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(audio_config(Wav2Vec2Config))


def hubert() -> nn.Module:
    from transformers import HubertConfig, HubertModel

    return HubertModel(audio_config(HubertConfig))


def wavlm() -> nn.Module:
    """WavLM: its attention calls F.multi_head_attention_forward with separate projections
    and an unused empty in_proj_weight made on the CPU."""
    from transformers import WavLMConfig, WavLMModel

    return WavLMModel(audio_config(WavLMConfig))


def raw_audio() -> Dict[str, torch.Tensor]:
    return {"input_values": torch.randn(BATCH, 1600)}


def whisper_config() -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


def whisper() -> nn.Module:
    from transformers import WhisperModel

    return WhisperModel(whisper_config())


def whisper_encoder() -> nn.Module:
    from transformers import WhisperModel

    encoder: nn.Module = WhisperModel(whisper_config()).get_encoder()
    return encoder


def log_mel() -> torch.Tensor:
    """(batch, mel bins, frames): what WhisperFeatureExtractor returns, 2 frames a position."""
    return torch.randn(BATCH, 8, 32)


# -- encoder-decoders -----------------------------------------------------------------------
def bart_config() -> Any:
    from transformers import BartConfig

    return BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )


def bart() -> nn.Module:
    from transformers import BartModel

    return BartModel(bart_config())


def reformer() -> nn.Module:
    """Reformer: reversible layers, whose backward pass asserts that the model is in
    training mode, and LSH attention, which draws random rotations in every mode."""
    from transformers import ReformerConfig, ReformerModel

    return ReformerModel(
        ReformerConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_attention_heads=2,
            attention_head_size=16,
            feed_forward_size=64,
            attn_layers=["local", "lsh"],
            axial_pos_shape=[2, 4],
            axial_pos_embds_dim=[16, 16],
            max_position_embeddings=LENGTH,
            local_attn_chunk_length=4,
            lsh_attn_chunk_length=4,
            num_buckets=2,
            pad_token_id=0,
        )
    )


def long_t5() -> nn.Module:
    """LongT5 with transient-global attention, whose relative positions are made with
    device=None when its weights are on meta (on the CPU then), on the weights' device else."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    return LongT5ForConditionalGeneration(
        LongT5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            local_radius=2,
            global_block_size=4,
            encoder_attention_type="transient-global",
            pad_token_id=0,
            decoder_start_token_id=0,
        )
    )


def bart_lm() -> nn.Module:
    from transformers import BartForConditionalGeneration

    return BartForConditionalGeneration(bart_config())


def bart_labels_only() -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {**token_batch(), "labels": torch.randint(3, VOCAB, (BATCH, 6), generator=generator)}


# -- vision ---------------------------------------------------------------------------------
def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        model: nn.Module = timm.create_model(name, pretrained=False, **kwargs)
        return model

    build.__name__ = f"timm_{name}"
    return build


timm_swin = timm_model(  # timm's default drop_path_rate for Swin is 0.1: stochastic depth
    "swin_tiny_patch4_window7_224",
    img_size=32,
    patch_size=4,
    window_size=4,
    embed_dim=16,
    depths=(1, 1),
    num_heads=(1, 2),
    num_classes=10,
)
timm_efficientnet = timm_model("test_efficientnet", num_classes=10, drop_path_rate=0.2)
timm_convnext = timm_model(
    "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=10, drop_path_rate=0.1
)
timm_vit = timm_model(
    "vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    depth=2,
    num_classes=10,
    drop_path_rate=0.1,
)


def torchvision_mobilenet() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=10)


def torchvision_efficientnet() -> nn.Module:
    """torchvision's EfficientNet with the first three stages of B0 (MBConv blocks with
    squeeze-excitation, stochastic depth 0.2 and dropout 0.2, as efficientnet_b0 has them)."""
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    stages = [
        MBConvConfig(1, 3, 1, 16, 16, 1),
        MBConvConfig(6, 3, 2, 16, 24, 2),
        MBConvConfig(6, 5, 2, 24, 40, 2),
    ]
    return EfficientNet(stages, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10)


def timm_levit() -> nn.Module:
    import timm

    return timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10)


def timm_poolformer() -> nn.Module:
    import timm

    return timm.create_model("poolformer_s12", pretrained=False, num_classes=10)


def torchvision_densenet() -> nn.Module:
    """torchvision's DenseNet, small, with memory_efficient=True: each dense layer's
    BatchNorm, ReLU and convolution run under torch.utils.checkpoint when its inputs need a
    gradient, so a backward pass runs them again, reading the layers' modes then."""
    from torchvision.models import DenseNet

    return DenseNet(
        growth_rate=8,
        block_config=(2, 2),
        num_init_features=16,
        bn_size=2,
        memory_efficient=True,
        num_classes=10,
    )


class BatchNormNet(nn.Module):
    """Convolutions with BatchNorm2d, a hidden layer with BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def vitmae() -> nn.Module:
    """ViTMAE: masks a random 75% of the patches in every forward pass (eval too), by design."""
    from transformers import ViTMAEConfig, ViTMAEModel

    return ViTMAEModel(ViTMAEConfig(**TINY_VIT))


# -- adapters -------------------------------------------------------------------------------
def lora_gpt2() -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(gpt2(), config)


def lora_vit() -> nn.Module:
    import peft

    base = timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    config = peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    return peft.get_peft_model(base(), config)


# -- generative models ----------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal timestep embedding of DDPM (float32, as diffusers computes it)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t[:, None].float() * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time = nn.Linear(time_dim, channels_out)
        self.norm2 = nn.GroupNorm(4, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TinyUNet(nn.Module):
    """A DDPM noise predictor ``model(noisy_images, timesteps)``: a timestep embedding cast to
    the sample's dtype (as diffusers' UNet2DModel does), residual blocks with GroupNorm, one
    down- and one up-sampling level with a skip connection."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.time = nn.Sequential(
            nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width)
        )
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.down = ResBlock(width, width, 4 * width)
        self.downsample = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.middle = ResBlock(2 * width, 2 * width, 4 * width)
        self.upsample = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.up = ResBlock(2 * width, width, 4 * width)
        self.out = nn.Sequential(
            nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1)
        )

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(timesteps, self.width).to(sample.dtype))
        skip = self.down(self.stem(sample), emb)
        h = self.upsample(self.middle(self.downsample(skip), emb))
        return self.out(self.up(torch.cat([h, skip], dim=1), emb))


def noisy_images() -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, 1, 16, 16), torch.randint(0, 1000, (BATCH,))


def dcgan_generator() -> nn.Module:
    """DCGAN's generator (PyTorch's examples/dcgan, smaller): latent (B, 16, 1, 1) -> image."""
    model = nn.Sequential(
        nn.ConvTranspose2d(16, 32, 4, 1, 0, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(True),
        nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(True),
        nn.ConvTranspose2d(16, 1, 4, 2, 1, bias=False),
        nn.Tanh(),
    )
    for module in model.modules():  # the example's weights_init
        if isinstance(module, nn.ConvTranspose2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)
    return model


def spectral_norm_discriminator() -> nn.Module:
    """An SN-GAN discriminator: every layer under spectral norm (a power iteration that
    updates its ``u`` and ``v`` buffers in each training-mode forward pass)."""
    sn = nn.utils.parametrizations.spectral_norm
    return nn.Sequential(
        sn(nn.Conv2d(1, 16, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        sn(nn.Conv2d(16, 32, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        sn(nn.Linear(32 * 4 * 4, 1)),
    )


class GumbelAutoEncoder(nn.Module):
    """A categorical-latent autoencoder: straight-through Gumbel-softmax samples in training,
    the most likely category at evaluation; returns (reconstruction, code logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
        self.decoder = nn.Sequential(nn.Linear(32, 64), nn.Unflatten(1, (1, 8, 8)))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.encoder(x).view(-1, 4, 8)
        if self.training:
            code = F.gumbel_softmax(logits, tau=1.0, hard=True)
        else:
            code = F.one_hot(logits.argmax(-1), 8).to(logits.dtype)
        return self.decoder(code.flatten(1)), logits


class Policy(nn.Module):
    """An actor-critic policy: action logits, the state value, and an action sampled from the
    logits (acting samples in every mode, as in PPO's rollouts)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.actor = nn.Linear(32, 4)
        self.critic = nn.Linear(32, 1)

    def forward(self, observation: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.body(observation)
        logits = self.actor(hidden)
        action = torch.distributions.Categorical(logits=logits).sample()
        return logits, self.critic(hidden).squeeze(-1), action


# -- other designs --------------------------------------------------------------------------
def quantisation_aware() -> nn.Module:
    """A CNN prepared for quantisation-aware training (torch.ao.quantization.prepare_qat):
    fake-quantised weights and activations whose observers keep running in eval mode."""
    from torch.ao import quantization

    model = nn.Sequential(
        quantization.QuantStub(),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
        quantization.DeQuantStub(),
    )
    model.qconfig = quantization.get_default_qat_qconfig("x86")
    model.train()
    prepared: nn.Module = quantization.prepare_qat(model)
    return prepared


class TiedLM(nn.Module):
    """A GRU language model whose output layer shares the embedding matrix (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


class LinearProbe(nn.Module):
    """A linear classifier on a frozen backbone: its parameters do not require gradients, it
    runs under torch.no_grad() and stays in eval mode (its BatchNorm statistics frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm_model("test_resnet", num_classes=0)()
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(int(self.backbone.num_features), 10)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


class BagOfWords(nn.Module):
    """fastText: the mean of sparse word embeddings (trained with SparseAdam or SGD) -> scores."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(VOCAB, 16, mode="mean", sparse=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class SpectrogramClassifier(nn.Module):
    """Raw audio -> log-magnitude STFT (its Hann window a buffer) -> a small CNN -> scores."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(64))
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(
            audio, n_fft=64, hop_length=16, window=self.window, return_complex=True
        ).abs()
        return self.cnn(torch.log1p(spectrum).unsqueeze(1))


def blip() -> nn.Module:
    """BLIP captioning: a ViT and a BERT-style text decoder whose embeddings add their
    positions in place (``embeddings += position_embeddings``)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tiny, vocab_size=VOCAB, max_position_embeddings=16, pad_token_id=0)
    vision = dict(tiny, image_size=32, patch_size=8)
    return BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    )


def fnet() -> nn.Module:
    """FNet: token mixing by a 2-D FFT instead of attention."""
    from transformers import FNetConfig, FNetModel

    return FNetModel(
        FNetConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    )


class Float32Logits(nn.Module):
    """A classifier that upcasts its logits with .float(), as transformers' language models
    do, for a stable softmax and loss in mixed precision."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()


class TabularModel(nn.Module):
    """fastai's tabular model: an embedding per categorical column, BatchNorm on the numeric
    columns, an MLP on the concatenation; called as ``model(categorical, numeric)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, 4) for n in (5, 7, 3))
        self.numeric = nn.BatchNorm1d(5)
        self.mlp = nn.Sequential(nn.Linear(17, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        columns = [embed(categorical[:, i]) for i, embed in enumerate(self.embeds)]
        return self.mlp(torch.cat([*columns, self.numeric(numeric)], dim=1))


def table() -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    categorical = torch.stack(
        [torch.randint(0, n, (BATCH,), generator=generator) for n in (5, 7, 3)], dim=1
    )
    return categorical, torch.randn(BATCH, 5, generator=generator)


def lightning_module() -> nn.Module:
    """A LightningModule (hyperparameters saved, its own training and validation steps):
    the model a Lightning user has at hand."""
    import pytorch_lightning as pl

    class LitClassifier(pl.LightningModule):
        def __init__(self, hidden: int = 32, learning_rate: float = 1e-3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(), nn.Dropout(0.1)
            )
            self.head = nn.Linear(hidden, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val/loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)

    return LitClassifier()


# label: (mixin, setUp attributes, allowed skips); "model"/"inputs" are built per test.
Case = Tuple[type, Dict[str, Any], Tuple[str, ...]]


def causal_lm(build: Callable[[], nn.Module], skips: Tuple[str, ...] = ()) -> Case:
    """A decoder-only language model, as docs/howto-real-models.md sets one up: left
    padding, position ids from the mask."""
    return (
        SequenceModelTests,
        dict(
            model=shared(build),
            inputs=lambda: with_position_ids(token_batch(left_padding=True)),
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=build,
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        ),
        skips,
    )


def audio_encoder(build: Callable[[], nn.Module]) -> Case:
    """A transformers speech encoder on raw audio: SpecAugment and LayerDrop make its
    training mode differ by design."""
    return (
        ModelTests,
        dict(
            model=shared(build),
            inputs=raw_audio,
            expected_output_shape=(BATCH, AUDIO_FRAMES, 32),
            make_model=build,
        ),
        (SPEC_AUGMENT,),
    )


def image_classifier(build: Callable[[], nn.Module]) -> Case:
    return (
        ModelTests,
        dict(
            model=shared(build),
            inputs=images,
            expected_output_shape=(BATCH, 10),
            make_model=build,
        ),
        (),
    )


DESIGN_ZOO: Dict[str, Case] = {
    # variational autoencoders
    "PyTorch examples/vae VAE (samples in both modes)": (
        ModelTests,
        dict(
            model=shared(ExamplesVAE),
            inputs=lambda: torch.rand(BATCH, 1, 28, 28),
            expected_output_shape=(BATCH, 784),
            make_model=ExamplesVAE,
        ),
        (samples_at_evaluation("output[0]"),),
    ),
    "example project MLPVAE": (
        ModelTests,
        dict(
            model=shared(mlp_vae),
            inputs=lambda: torch.randn(BATCH, 1, 32, 32),
            make_model=mlp_vae,
        ),
        (),
    ),
    "example project CNNVAE": (
        ModelTests,
        dict(
            model=shared(cnn_vae),
            inputs=lambda: torch.randn(BATCH, 1, 32, 32),
            make_model=cnn_vae,
        ),
        (),
    ),
    # contrastive
    "transformers CLIPModel, output_key unset (logits_per_image)": (
        ModelTests,
        dict(
            model=shared(clip),
            inputs=clip_inputs,
            expected_output_shape=(BATCH, BATCH),
            make_model=clip,
        ),
        (PAIRWISE,),
    ),
    "transformers CLIPModel, output_key='text_embeds'": (
        ModelTests,
        dict(
            model=shared(clip),
            inputs=clip_inputs,
            output_key="text_embeds",
            expected_output_shape=(BATCH, 16),
            make_model=clip,
        ),
        (),
    ),
    "transformers CLIPModel, similarity matrices in cross_sample_outputs": (
        ModelTests,
        dict(
            model=shared(clip),
            inputs=clip_inputs,
            cross_sample_outputs=["logits_per_image", "logits_per_text"],
            expected_output_shape=(BATCH, 16),  # text_embeds, the first output not listed
        ),
        (NO_MAKE_MODEL,),
    ),
    "transformers CLIPModel, output_key='image_embeds'": (
        ModelTests,
        dict(
            model=shared(clip),
            inputs=clip_inputs,
            output_key="image_embeds",
            expected_output_shape=(BATCH, 16),
        ),
        (NO_MAKE_MODEL,),
    ),
    # mixtures of experts
    "transformers Mixtral, causal LM, left padding": causal_lm(mixtral, (GROUPED_MM,)),
    "transformers Qwen2-MoE, causal LM, left padding": causal_lm(qwen2_moe, (GROUPED_MM,)),
    "transformers Mixtral, called with labels and output_router_logits (aux loss)": (
        ModelTests,
        dict(
            model=shared(mixtral_router_logits),
            inputs=lambda: {**token_batch(), "labels": token_batch()["input_ids"]},
            output_key="logits",
            expected_output_shape=(BATCH, LENGTH, VOCAB),
        ),
        (NO_MAKE_MODEL, GROUPED_MM),
    ),
    "hand-written top-2 MoE layer with a load-balancing loss": (
        ModelTests,
        dict(
            model=shared(TopKMoE),
            inputs=lambda: torch.randn(BATCH, LENGTH, 16),
            expected_output_shape=(BATCH, LENGTH, 16),
            make_model=TopKMoE,
        ),
        (),
    ),
    # state-space models
    "transformers Mamba, causal LM, left padding": (
        SequenceModelTests,
        dict(
            model=shared(mamba),
            inputs=lambda: token_batch(left_padding=True),
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=mamba,
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        ),
        (),
    ),
    "transformers Mamba2, causal LM, left padding": (
        SequenceModelTests,
        dict(
            model=shared(mamba2),
            inputs=lambda: token_batch(left_padding=True),
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=mamba2,
            sequence_dim=1,
            causal=True,
            padding_mask="attention_mask",
        ),
        (),
    ),
    # segmentation
    "torchvision LRASPP MobileNetV3": (
        ModelTests,
        dict(
            model=shared(lraspp),
            inputs=images,
            output_key="out",
            expected_output_shape=(BATCH, 5, 32, 32),
            make_model=lraspp,
        ),
        (),
    ),
    # audio
    "transformers wav2vec2, raw audio": audio_encoder(wav2vec2),
    "transformers WavLM, raw audio": audio_encoder(wavlm),
    "transformers HuBERT, raw audio": (
        ModelTests,
        dict(
            model=shared(hubert),
            inputs=raw_audio,
            expected_output_shape=(BATCH, AUDIO_FRAMES, 32),
        ),
        (NO_MAKE_MODEL, SPEC_AUGMENT),
    ),
    "transformers Whisper encoder, log-mel features": (
        ModelTests,
        dict(
            model=shared(whisper_encoder),
            inputs=lambda: {"input_features": log_mel()},
            expected_output_shape=(BATCH, 16, 32),
            make_model=whisper_encoder,
        ),
        (),
    ),
    # encoder-decoders (T5: tests/test_zoo.py)
    "transformers BART, encoder-decoder": (
        SequenceModelTests,
        dict(
            model=shared(bart),
            inputs=lambda: {**token_batch(), "decoder_input_ids": token_batch()["input_ids"]},
            expected_output_shape=(BATCH, LENGTH, 32),
            make_model=bart,
            sequence_dim=1,
            causal=True,
            sequence_inputs=["decoder_input_ids"],
        ),
        (NO_MASK,),
    ),
    "transformers LongT5, transient-global attention": (
        SequenceModelTests,
        dict(
            model=shared(long_t5),
            inputs=lambda: {**token_batch(), "decoder_input_ids": token_batch()["input_ids"]},
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            output_key="logits",
            make_model=long_t5,
            sequence_dim=1,
            causal=True,
            sequence_inputs=["decoder_input_ids"],
        ),
        (NO_MASK, DEVICE_CHOSEN_FOR_META),
    ),
    "transformers Reformer, reversible layers and LSH attention": (
        SequenceModelTests,
        dict(
            model=shared(reformer),
            inputs=token_batch,
            expected_output_shape=(BATCH, LENGTH, 2 * 32),  # its two reversible streams
            output_key="last_hidden_state",
            make_model=reformer,
            sequence_dim=1,
            padding_mask="attention_mask",
        ),
        (
            NOT_CAUSAL,
            GRADIENTS_REFUSED,
            samples_at_evaluation("output.last_hidden_state"),
        ),
    ),
    # vision
    "timm Swin (stochastic depth 0.1)": image_classifier(timm_swin),
    "timm EfficientNet (stochastic depth 0.2)": image_classifier(timm_efficientnet),
    "timm ConvNeXt (stochastic depth 0.1, layer scale)": image_classifier(timm_convnext),
    "timm ViT (stochastic depth 0.1)": image_classifier(timm_vit),
    "torchvision EfficientNet, B0's first stages (stochastic depth 0.2)": image_classifier(
        torchvision_efficientnet
    ),
    "BatchNorm2d and BatchNorm1d CNN": image_classifier(BatchNormNet),
    "torchvision DenseNet, memory-efficient (checkpointed BatchNorm)": image_classifier(
        torchvision_densenet
    ),
    "transformers ViTMAE (random masking in every mode)": (
        ModelTests,
        dict(
            model=shared(vitmae),
            inputs=lambda: {"pixel_values": images()},
            expected_output_shape=(BATCH, 5, 32),
            make_model=vitmae,
        ),
        (
            samples_at_evaluation("output.last_hidden_state"),
            # its 0/1 mask, made by torch.ones without dtype=: a constant, reported
            "a copy moved with .to(torch.bfloat16) returns output.mask (torch.float32, made by "
            "torch.ones without dtype=",
            "a copy moved with .to(torch.float64) returns output.mask (torch.float32, made by "
            "torch.ones without dtype=",
        ),
    ),
    # adapters
    "PEFT LoRA (dropout 0.1) on GPT-2, causal LM": causal_lm(lora_gpt2),
    "PEFT LoRA on a timm ViT, head trained": image_classifier(lora_vit),
    # generative models
    "diffusion UNet (timestep embedding, GroupNorm)": (
        ModelTests,
        dict(
            model=shared(TinyUNet),
            inputs=noisy_images,
            expected_output_shape=(BATCH, 1, 16, 16),
            make_model=TinyUNet,
        ),
        (),
    ),
    "DCGAN generator": (
        ModelTests,
        dict(
            model=shared(dcgan_generator),
            inputs=lambda: torch.randn(BATCH, 16, 1, 1),
            expected_output_shape=(BATCH, 1, 16, 16),
            make_model=dcgan_generator,
        ),
        (),
    ),
    "spectral-norm GAN discriminator": (
        ModelTests,
        dict(
            model=shared(spectral_norm_discriminator),
            inputs=lambda: torch.randn(BATCH, 1, 16, 16),
            expected_output_shape=(BATCH, 1),
            make_model=spectral_norm_discriminator,
        ),
        (differs_in_training("output"),),  # its power iteration runs in training only
    ),
    "Gumbel-softmax autoencoder (samples in training only)": (
        ModelTests,
        dict(
            model=shared(GumbelAutoEncoder),
            inputs=lambda: torch.randn(BATCH, 1, 8, 8),
            expected_output_shape=(BATCH, 1, 8, 8),
            make_model=GumbelAutoEncoder,
        ),
        (differs_in_training("output[0]"),),  # Gumbel-softmax in training, argmax in eval
    ),
    "policy that samples its action (every mode)": (
        ModelTests,
        dict(
            model=shared(Policy),
            inputs=lambda: torch.randn(BATCH, 8),
            expected_output_shape=(BATCH, 4),
            make_model=Policy,
        ),
        (samples_at_evaluation("output[2]"),),
    ),
    # other designs
    "quantisation-aware training (prepare_qat)": (
        ModelTests,
        dict(
            model=quantisation_aware,  # its observers change in eval mode: not shared
            inputs=images,
            expected_output_shape=(BATCH, 10),
            make_model=quantisation_aware,
        ),
        (
            CHANGES_BETWEEN_CALLS,  # its observers update the scales in every forward pass
            "torch.fused_moving_avg_obs_fake_quant in 0.activation_post_process",  # float32 only
            "no dtype could be checked. torch.bfloat16: torch.fused_moving_avg_obs_fake_quant",
        ),
    ),
    "weight tying (GRU language model)": (
        SequenceModelTests,
        dict(
            model=shared(TiedLM),
            inputs=lambda: token_batch()["input_ids"],
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=TiedLM,
            sequence_dim=1,
            causal=True,
        ),
        (NO_MASK,),
    ),
    "frozen backbone under torch.no_grad (linear probe)": (
        *image_classifier(LinearProbe)[:2],
        (FROZEN_NORMALISATION,),  # its train() keeps the backbone's BatchNorm in eval mode
    ),
    "sparse EmbeddingBag (fastText)": (
        ModelTests,
        dict(
            model=shared(BagOfWords),
            inputs=lambda: token_batch()["input_ids"],
            expected_output_shape=(BATCH, 3),
            make_model=BagOfWords,
        ),
        (),
    ),
    "STFT front end (audio classifier)": (
        ModelTests,
        dict(
            model=shared(SpectrogramClassifier),
            inputs=lambda: torch.randn(BATCH, 800),
            expected_output_shape=(BATCH, 5),
            make_model=SpectrogramClassifier,
        ),
        ("an operation of the model (torch.stft in SpectrogramClassifier",),
    ),
    "transformers BLIP captioning (image and text, positions added in place)": (
        SequenceModelTests,
        dict(
            model=shared(blip),
            inputs=lambda: {**token_batch(), "pixel_values": images()},
            output_key="logits",
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            make_model=blip,
            sequence_dim=1,
            sequence_inputs=["input_ids"],
            padding_mask="attention_mask",
            causal=True,
        ),
        (),
    ),
    "transformers FNet (FFT token mixing)": (
        ModelTests,
        dict(
            model=shared(fnet),
            inputs=lambda: {"input_ids": token_batch()["input_ids"]},
            expected_output_shape=(BATCH, LENGTH, 32),
            make_model=fnet,
        ),
        ("an operation of the model (torch.fft_fftn in encoder.layer.0.fourier",),
    ),
    "logits upcast with .float()": (
        ModelTests,
        dict(
            model=shared(Float32Logits),
            inputs=lambda: torch.randn(BATCH, 8),
            expected_output_shape=(BATCH, 4),
            make_model=Float32Logits,
        ),
        (),
    ),
    "tabular model, categorical and numeric columns": (
        ModelTests,
        dict(
            model=shared(TabularModel),
            inputs=table,
            expected_output_shape=(BATCH, 2),
            make_model=TabularModel,
        ),
        (),
    ),
    "transformers RWKV, causal LM (its state updated in place at evaluation)": (
        SequenceModelTests,
        dict(
            model=shared(rwkv),
            inputs=lambda: {"input_ids": token_batch()["input_ids"]},
            expected_output_shape=(BATCH, LENGTH, VOCAB),
            output_key="logits",
            make_model=rwkv,
            sequence_dim=1,
            causal=True,
        ),
        (
            NO_MASK,
            GRADIENTS_REFUSED,
            # its recurrent state kept in float32 on purpose, beside the computation
            "a copy moved with .to(torch.bfloat16) returns output.state[2] (torch.float32, "
            "made by torch.zeros with a fixed dtype",
            "a copy moved with .to(torch.float64) returns output.state[2] (torch.float32, "
            "made by torch.zeros with a fixed dtype",
        ),
    ),
}

if importlib.util.find_spec("pytorch_lightning"):  # the dev extra installs it
    DESIGN_ZOO["PyTorch Lightning LightningModule"] = image_classifier(lightning_module)


def diffusers_unet() -> nn.Module:
    """diffusers' conditional UNet, small: timestep embeddings, GroupNorm, cross-attention."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def latents_and_text() -> Dict[str, torch.Tensor]:
    return {
        "sample": torch.randn(BATCH, 4, 16, 16),
        "timestep": torch.tensor([1, 10, 100, 500]),
        "encoder_hidden_states": torch.randn(BATCH, 5, 12),
    }


if importlib.util.find_spec("diffusers"):  # the dev extra installs it
    DESIGN_ZOO["diffusers UNet2DConditionModel (timesteps, cross-attention)"] = (
        ModelTests,
        dict(
            model=shared(diffusers_unet),
            inputs=latents_and_text,
            output_key="sample",
            expected_output_shape=(BATCH, 4, 16, 16),
            make_model=diffusers_unet,
        ),
        (),
    )

#: Correct components left out of the default run to keep it short (their families are in
#: DESIGN_ZOO: LRASPP for segmentation, MobileNetV3 as its backbone, Whisper's encoder, BART
#: and T5 with labels in tests/test_zoo.py; LeViT's attention over one position has a test of
#: its own in DesignFalseAlarms); run with DLTESTKIT_ZOO_EXTENDED=1.
EXTENDED: Dict[str, Case] = {
    "timm LeViT on 64 x 64 images (its last stage attends over one position)": (
        ModelTests,
        dict(
            model=shared(timm_levit),
            inputs=lambda: torch.randn(BATCH, 3, 64, 64),
            expected_output_shape=(BATCH, 10),
            make_model=timm_levit,
        ),
        (ONE_POSITION,),
    ),
    "timm PoolFormer on 32 x 32 images (its last stage pools over one position)": (
        *image_classifier(timm_poolformer)[:2],
        (CANCELS_AT_THIS_SIZE,),
    ),
    "torchvision DeepLabV3 MobileNetV3": (
        ModelTests,
        dict(
            model=shared(deeplabv3),
            inputs=images,
            output_key="out",
            expected_output_shape=(BATCH, 5, 32, 32),
        ),
        (NO_MAKE_MODEL,),
    ),
    "torchvision MobileNetV3 small": image_classifier(torchvision_mobilenet),
    "transformers Whisper, encoder-decoder": (
        SequenceModelTests,
        dict(
            model=shared(whisper),
            inputs=lambda: {
                "input_features": log_mel(),
                "decoder_input_ids": token_batch()["input_ids"][:, :6],
            },
            expected_output_shape=(BATCH, 6, 32),
            sequence_dim=1,
            causal=True,
            sequence_inputs=["decoder_input_ids"],
        ),
        (NO_MAKE_MODEL, NO_MASK),
    ),
    "transformers BART, labels only": (
        SequenceModelTests,
        dict(
            model=shared(bart_lm),
            inputs=bart_labels_only,
            output_key="logits",
            expected_output_shape=(BATCH, 6, VOCAB),
            sequence_dim=1,
            causal=True,
            sees_present=False,
            sequence_inputs=["labels"],
        ),
        (NO_MAKE_MODEL, NO_MASK),
    ),
}


# -- more architectures, each as its library builds it from a small configuration ------------
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_DECODER = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1)


#: The vocabulary of the token batches (test_zoo.token_batch), for a token model's configuration.
_TOKENS = dict(vocab_size=VOCAB, pad_token_id=0)


def _transformers(kind: str, auto: str, **config: Any) -> Callable[[], nn.Module]:
    """A transformers model of ``kind`` (an AutoConfig name) built by ``auto`` (the name of
    an Auto class, or of a model class where no Auto class has its head) with random weights
    from a small configuration."""

    def build() -> nn.Module:
        import transformers

        made = transformers.AutoConfig.for_model(kind, **config)
        model_class = getattr(transformers, auto)
        model: nn.Module = (
            model_class.from_config(made) if auto.startswith("Auto") else model_class(made)
        )
        return model

    build.__name__ = kind.replace("-", "_")
    return build


def library_decoder(
    kind: str,
    positions: bool = True,
    left: bool = True,
    skips: Tuple[str, ...] = (),
    **config: Any,
) -> Case:
    """A decoder as transformers builds it, on a left-padded batch with position_ids (as
    generate passes them), or without them for a model that takes no positions (ALiBi, or
    none), or right-padded for one whose recurrence carries left padding into the real
    tokens (a causal model never reads right padding)."""
    build = _transformers(kind, "AutoModelForCausalLM", **_TOKENS, **config)

    def inputs() -> Dict[str, torch.Tensor]:
        batch = token_batch(left_padding=left)
        return with_position_ids(batch) if positions else batch

    attributes = dict(
        model=shared(build),
        inputs=inputs,
        expected_output_shape=(BATCH, LENGTH, VOCAB),
        output_key="logits",
        make_model=build,
        sequence_dim=1,
        causal=True,
        padding_mask="attention_mask",
    )
    return (SequenceModelTests, attributes, skips)


def library_encoder(kind: str, unused: Sequence[str] = (), **config: Any) -> Case:
    """An encoder as transformers builds it, on a right-padded batch; ``unused``: the
    parameters of branches these inputs do not take (listed as allowed)."""
    build = _transformers(kind, "AutoModel", **_TOKENS, **config)
    attributes = dict(
        model=shared(build),
        inputs=token_batch,
        expected_output_shape=(BATCH, LENGTH, 32),
        output_key="last_hidden_state",
        make_model=build,
        sequence_dim=1,
        padding_mask="attention_mask",
        allowed_unchanged_parameters=list(unused),
    )
    return (SequenceModelTests, attributes, (NOT_CAUSAL,))


def vision(build: Callable[[], nn.Module], size: int = 32, skips: Tuple[str, ...] = ()) -> Case:
    mixin, attributes, _ = image_classifier(build)
    return mixin, dict(attributes, inputs=lambda: torch.randn(BATCH, 3, size, size)), skips


def library_vision(
    kind: str,
    shape: Tuple[int, ...],
    unused: Sequence[str] = (),
    skips: Tuple[str, ...] = (),
    **config: Any,
) -> Case:
    """A vision backbone as transformers builds it (``AutoModel``), on 32 x 32
    ``pixel_values``, its ``last_hidden_state`` of ``shape``; ``unused``: parameters these
    inputs do not reach (a mask token for a pretraining mask)."""

    build = _transformers(kind, "AutoModel", **config)
    attributes = dict(
        model=shared(build),
        inputs=lambda: {"pixel_values": torch.randn(BATCH, 3, 32, 32)},
        output_key="last_hidden_state",
        expected_output_shape=(BATCH, *shape),
        make_model=build,
        allowed_unchanged_parameters=list(unused),
    )
    return (ModelTests, attributes, skips)


def grouped_mm(experts: str) -> str:
    """test_dtype_moving on experts run as one torch._grouped_mm, which has no float64
    kernel on the CPU."""
    return f"torch._grouped_mm in {experts}"


def _timm(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **options)

    build.__name__ = name
    return build


def _torchvision(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        model: nn.Module = getattr(torchvision.models, name)(
            weights=None, num_classes=10, **options
        )
        return model

    build.__name__ = name
    return build


_MOE = dict(num_experts=4, num_experts_per_tok=2)
#: test_train_matches_eval on a backbone that draws random numbers in training only
#: (stochastic depth, DINOv3's jittered rotary positions): a skip that names them.
STOCHASTIC_DEPTH = differs_in_training("output.last_hidden_state")
_VIT = dict(_SMALL, image_size=32, patch_size=8)
_STAGES = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])  # four stages of one block
_OPT = dict(_SMALL, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)
#: A later sweep (three seeds) of newer families: decoders with QK normalisation, multi-head
#: latent attention (DeepSeek-V3), hybrid convolution layers (LFM2), ternary weights (BitNet);
#: vision backbones with register tokens (DINOv2, DINOv3), post-norm windows (Swin V2),
#: global response normalisation (ConvNeXt V2), focal modulation, mobile and hybrid designs.
#: Its one false alarm, a parameter of no element (DINOv3's register tokens when there are
#: none), is fixed; DINO's mask token, read only with a pretraining mask, is listed unused. The
#: extended part runs the default checks on them, and test_model_stack_zoo's the stack checks.
NEWER_ARCHITECTURES: Dict[str, Case] = {
    **{
        f"transformers {kind} (causal LM)": library_decoder(kind, **{**_DECODER, **extra})
        for kind, extra in {
            "qwen3": dict(head_dim=8),
            "gemma3_text": dict(head_dim=8, sliding_window=4),
            "smollm3": {},
            "helium": dict(head_dim=8),
            "glm4": dict(head_dim=8),
            "nemotron": dict(head_dim=8),
            "arcee": {},
            "exaone4": dict(sliding_window=4),
            "ernie4_5": {},
            "seed_oss": dict(head_dim=8),
            "apertus": {},
            "ministral": dict(head_dim=8, rope_theta=10000.0),
            "bitnet": {},
            "lfm2": {},
            "hunyuan_v1_dense": dict(head_dim=8),
        }.items()
    },
    **{
        f"transformers {kind} (causal LM, experts)": library_decoder(
            kind, skips=(grouped_mm(experts),), **{**_DECODER, **extra}
        )
        for kind, experts, extra in (
            (
                "qwen3_moe",
                "model.layers.0.mlp.experts",
                dict(head_dim=8, moe_intermediate_size=32, **_MOE),
            ),
            ("olmoe", "model.layers.0.mlp.experts", _MOE),
            (
                "deepseek_v3",
                "model.layers.1.mlp.experts",
                dict(
                    num_key_value_heads=4,
                    kv_lora_rank=8,
                    q_lora_rank=8,
                    qk_rope_head_dim=4,
                    qk_nope_head_dim=4,
                    v_head_dim=8,
                    n_routed_experts=4,
                    num_experts_per_tok=2,
                    moe_intermediate_size=16,
                    first_k_dense_replace=1,
                    n_group=1,
                    topk_group=1,
                ),
            ),
        )
    },
    "transformers roformer (encoder)": library_encoder("roformer", **_SMALL, embedding_size=32),
    "transformers ernie (encoder)": library_encoder("ernie", **_SMALL),
    "transformers dinov2 (vision)": library_vision(
        "dinov2",
        (17, 32),
        unused=["embeddings.mask_token"],
        skips=(STOCHASTIC_DEPTH,),
        **_VIT,
        drop_path_rate=0.1,
    ),
    "transformers dinov2_with_registers (vision)": library_vision(
        "dinov2_with_registers", (21, 32), unused=["embeddings.mask_token"], **_VIT
    ),
    # its rotary positions are jittered in training
    "transformers dinov3_vit (vision, no register tokens)": library_vision(
        "dinov3_vit",
        (17, 32),
        unused=["embeddings.mask_token"],
        skips=(STOCHASTIC_DEPTH,),
        **_VIT,
    ),
    "transformers siglip_vision_model (vision)": library_vision(
        "siglip_vision_model", (16, 32), **_VIT
    ),
    "transformers beit (vision)": library_vision(
        "beit",
        (17, 32),
        skips=(STOCHASTIC_DEPTH,),
        **_VIT,
        use_relative_position_bias=True,
        drop_path_rate=0.1,
    ),
    "transformers swinv2 (vision)": library_vision(  # (stochastic depth 0.1 by default)
        "swinv2",
        (16, 32),
        skips=(STOCHASTIC_DEPTH,),
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        image_size=32,
        window_size=4,
    ),
    "transformers convnextv2 (vision)": library_vision(
        "convnextv2", (64, 1, 1), skips=(STOCHASTIC_DEPTH,), **_STAGES, drop_path_rate=0.1
    ),
    # its last stage attends over one position at 32 x 32
    "transformers pvt_v2 (vision)": library_vision(
        "pvt_v2", (64, 1, 1), skips=(ONE_POSITION,), **_STAGES, num_attention_heads=[1, 1, 2, 2]
    ),
    # (stochastic depth 0.1 by default)
    "transformers focalnet (vision)": library_vision(
        "focalnet",
        (16, 32),
        skips=(STOCHASTIC_DEPTH,),
        embed_dim=16,
        depths=[1, 1],
        focal_levels=[2, 2],
        focal_windows=[3, 3],
        image_size=32,
        patch_size=4,
    ),
    "timm EVA02": vision(_timm("eva02_tiny_patch14_224", img_size=28, drop_path_rate=0.1), size=28),
    "timm ConvNeXt V2": vision(_timm("convnextv2_atto", drop_path_rate=0.1)),
    "timm FastViT": vision(_timm("fastvit_t8"), size=64),
    "timm EfficientViT (MIT)": vision(_timm("efficientvit_b0"), size=64),
    "timm MaxViT": vision(_timm("maxvit_pico_rw_256", img_size=64), size=64),
    "timm RegNetY": vision(_timm("regnety_002")),
    "timm DeiT, distilled": vision(
        _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8)
    ),
    "timm MobileNetV4": vision(_timm("mobilenetv4_conv_small")),
    "timm GhostNetV2": vision(_timm("ghostnetv2_100"), size=64),
    "timm CoAtNet": vision(_timm("coatnet_nano_rw_224", img_size=64), size=64),
    "timm Hiera": vision(_timm("hiera_tiny_224", img_size=64), size=64),
    "torchvision Swin V2": vision(_torchvision("swin_v2_t"), size=64),
    "torchvision RegNetY": vision(_torchvision("regnet_y_400mf")),
    "torchvision EfficientNetV2": vision(_torchvision("efficientnet_v2_s")),
    "torchvision ConvNeXt": vision(_torchvision("convnext_tiny")),
}

#: The extended zoo's architectures found correct by a sweep of every check (three seeds):
#: decoders with sliding windows, soft-capping, partial rotary, ALiBi, parallel attention,
#: mixtures of experts and Mamba layers, recurrent blocks; encoders with relative, disentangled
#: and sparse attention; vision models without normalisation, re-parameterisable branches,
#: MLP mixing and auxiliary heads in training mode. (True findings of that sweep stay out:
#: ConvBERT's span convolution and Nystromformer, which raises with an attention mask.)
ARCHITECTURES: Dict[str, Case] = {
    **{
        f"transformers {kind} (causal LM)": library_decoder(kind, **_DECODER, **extra)
        for kind, extra in {
            "mistral": dict(sliding_window=4),
            "qwen2": {},
            "gemma": dict(head_dim=8),
            "gemma2": dict(
                head_dim=8,
                sliding_window=4,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0,
            ),
            "phi3": {},
            "stablelm": {},
            "starcoder2": {},
            "olmo": {},
            "olmo2": {},
            "cohere": {},
            "granite": {},
            "glm": dict(head_dim=8),
            "gpt_neox": {},
            "phi": {},
        }.items()
    },
    "transformers granitemoe (causal LM)": library_decoder(
        "granitemoe",
        skips=(grouped_mm("model.layers.0.block_sparse_moe.experts"),),
        **_DECODER,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "transformers opt (causal LM)": library_decoder("opt", **_OPT),
    "transformers falcon (causal LM)": library_decoder(
        "falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    ),
    "transformers gptj (causal LM)": library_decoder(
        "gptj", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64
    ),
    "transformers codegen (causal LM)": library_decoder(
        "codegen", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64
    ),
    "transformers gpt_bigcode (causal LM)": library_decoder(
        "gpt_bigcode", n_embd=32, n_layer=2, n_head=4, n_positions=64
    ),
    # ALiBi from the attention mask; Jamba's attention has no positions (its Mamba layers
    # give them): position_ids would be an input they never read
    "transformers bloom (causal LM, ALiBi)": library_decoder(
        "bloom", positions=False, hidden_size=32, n_layer=2, n_head=4
    ),
    "transformers jamba (causal LM, Mamba and experts)": library_decoder(
        "jamba",
        positions=False,
        skips=(grouped_mm("model.layers.1.feed_forward.experts"),),
        **_DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        use_mamba_kernels=False,
        mamba_d_state=4,
        mamba_expand=2,
    ),
    # its recurrent blocks run over every position: left padding would reach the real tokens
    "transformers recurrent_gemma (causal LM, right padding)": library_decoder(
        "recurrent_gemma",
        left=False,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        head_dim=8,
        lru_width=32,
        attention_window_size=4,
    ),
    **{
        f"transformers {kind} (encoder)": library_encoder(kind, **_SMALL, **extra)
        for kind, extra in {
            "albert": dict(embedding_size=16),
            "electra": dict(embedding_size=32),
            "deberta": {},
            "deberta-v2": {},
            "mpnet": {},
            "modernbert": {},
            "big_bird": dict(attention_type="block_sparse", block_size=2, num_random_blocks=1),
        }.items()
    },
    # their global attention (Longformer) and segment biases (XLNet) are for inputs these
    # batches do not have (global_attention_mask, token_type_ids)
    "transformers longformer (encoder)": library_encoder(
        "longformer",
        unused=["encoder.layer.*.attention.self.*_global.*"],
        **_SMALL,
        attention_window=4,
    ),
    "transformers xlnet (encoder)": library_encoder(
        "xlnet",
        unused=["mask_emb", "layer.*.rel_attn.r_s_bias", "layer.*.rel_attn.seg_embed"],
        d_model=32,
        n_layer=2,
        n_head=4,
        d_inner=64,
    ),
    "timm NF-ResNet (no normalisation layers)": vision(_timm("nf_resnet26")),
    "timm RepVGG (re-parameterisable branches)": vision(_timm("repvgg_a0")),
    "timm MLP-Mixer": vision(_timm("mixer_s16_224", img_size=32, drop_path_rate=0.1)),
    "timm ResNeSt (split attention)": vision(_timm("resnest14d")),
    # its auxiliary classifiers' logits join the output in training mode only: its logits,
    # output[0] in training, are compared with eval mode's
    "torchvision GoogLeNet (auxiliary logits in training mode)": vision(
        _torchvision("googlenet", aux_logits=True, init_weights=False), size=64
    ),
    "torchvision ShuffleNetV2": vision(_torchvision("shufflenet_v2_x0_5")),
}
EXTENDED.update(ARCHITECTURES)


# -- the families of a later sweep: detection, depth, multimodal models, forecasting, codecs --
#: The image placeholder of the multimodal models below: a token past the batches' vocabulary,
#: which their text models (of VOCAB + 1 tokens, _WITH_IMAGE_TOKEN) have.
IMAGE_TOKEN = VOCAB
_WITH_IMAGE_TOKEN = dict(vocab_size=VOCAB + 1, pad_token_id=0)
#: The hybrid decoders' sizes, their Mamba2 layers' included.
_HYBRID = dict(_DECODER, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False)
#: DPT's and Depth Anything's neck and head: four ViT layers reassembled and fused.
_DEPTH = dict(neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)


def _two_stacks(
    encoder_layers: int, decoder_layers: int, d_model: int, heads: int, ffn_dim: int
) -> Dict[str, int]:
    """The sizes of a transformers encoder-decoder of width ``d_model``, its attention
    ``heads`` and feed-forward ``ffn_dim`` the same on both sides."""
    sides = ("encoder", "decoder")
    return {
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "d_model": d_model,
        **{f"{side}_attention_heads": heads for side in sides},
        **{f"{side}_ffn_dim": ffn_dim for side in sides},
    }


#: The encoder-decoder forecasters: one series and one time feature, 4 steps forecast from a
#: context of 8 and lags of up to 2.
_FORECASTER: Dict[str, Any] = dict(input_size=1, num_time_features=1, context_length=8)
_FORECASTER.update(prediction_length=4, lags_sequence=[1, 2], **_two_stacks(2, 1, 16, 2, 32))
_HISTORY = _FORECASTER["context_length"] + max(_FORECASTER["lags_sequence"])


def pixel_values(size: int = 32) -> Callable[[], Dict[str, torch.Tensor]]:
    """Inputs of ``size`` x ``size`` images, as an image processor gives them."""
    return lambda: {"pixel_values": torch.randn(BATCH, 3, size, size)}


def captioned_images(placeholders: int, left_padding: bool = False) -> Dict[str, torch.Tensor]:
    """What a multimodal processor gives for 4 images and texts: ``placeholders`` image tokens
    before each text, the pad token (0) after it, or before the image tokens
    (``left_padding``)."""
    text = token_batch(left_padding)
    ids = torch.cat([torch.full((BATCH, placeholders), IMAGE_TOKEN), text["input_ids"]], 1)
    mask = torch.cat([torch.ones_like(ids[:, :placeholders]), text["attention_mask"]], 1)
    if left_padding:  # each row's padding moved to its start
        order = mask.argsort(dim=1, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    return {
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "pixel_values": images(),
    }


def prefixed_images() -> Dict[str, torch.Tensor]:
    """PaliGemmaProcessor's: token_type_ids 0 over the prefix (its image and text, no suffix),
    which the model attends both ways."""
    batch = captioned_images(16)
    return {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}


def images_and_captions() -> Dict[str, torch.Tensor]:
    captions = token_batch()
    return {
        "pixel_values": images(),
        "decoder_input_ids": captions["input_ids"],
        "decoder_attention_mask": captions["attention_mask"],
    }


def proteins() -> Dict[str, torch.Tensor]:
    """What EsmTokenizer returns: <cls> (0), residues, <eos> (2), <pad> (1) on the right."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 24, (BATCH, 10), generator=generator)
    mask = torch.ones(BATCH, 10, dtype=torch.long)
    for row, length in enumerate((7, 9, 10, 10)):
        ids[row, 0], ids[row, length - 1] = 0, 2
        ids[row, length:] = 1
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def histories() -> Dict[str, torch.Tensor]:
    """What a GluonTS-style collator gives a forecaster: the past values (the context and the
    largest lag), the future ones, their time features and the observed mask."""
    generator = torch.Generator().manual_seed(1)
    time = torch.arange(_HISTORY + 4, dtype=torch.float).repeat(BATCH, 1)[..., None] / 10
    return {
        "past_values": torch.randn(BATCH, _HISTORY, generator=generator),
        "past_time_features": time[:, :_HISTORY],
        "past_observed_mask": torch.ones(BATCH, _HISTORY),
        "future_values": torch.randn(BATCH, 4, generator=generator),
        "future_time_features": time[:, _HISTORY:],
    }


def waveforms() -> Dict[str, torch.Tensor]:
    return {"input_values": torch.randn(BATCH, 1, 160)}


def audio_codec(kind: str, **config: Any) -> Callable[[], nn.Module]:
    """A transformers audio codec of ``kind``: 160 samples (0.2 s) in, codes of 16 entries."""
    return _transformers(
        kind, "AutoModel", sampling_rate=800, hidden_size=16, codebook_size=16, **config
    )


_encodec = audio_codec(
    "encodec",
    target_bandwidths=[1.5],
    audio_channels=1,
    num_filters=4,
    num_residual_layers=1,
    upsampling_ratios=[4, 2],
    codebook_dim=16,
    num_lstm_layers=1,
    kernel_size=3,
    last_kernel_size=3,
    residual_kernel_size=3,
)


def encodec() -> nn.Module:
    """EnCodec as a checkpoint gives it: from_config leaves the codebooks (buffers) at zero,
    which makes every output the same; a trained codec has distinct code vectors. Each is
    initialised from encoded frames, as EnCodec's training starts (k-means-like)."""
    model = _encodec()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        frames = model.encoder(torch.randn(8, 1, 160, generator=generator))
        residual = frames.transpose(1, 2).reshape(-1, frames.shape[1])
        for layer in model.quantizer.layers:
            codebook = layer.codebook
            chosen = residual[torch.randperm(residual.shape[0], generator=generator)[:16]]
            codebook.embed.copy_(chosen)
            codebook.embed_avg.copy_(chosen)
            codebook.inited.fill_(1.0)
            residual = residual - codebook.decode(codebook.encode(residual))
    return model


def swept_model(
    build: Callable[[], nn.Module],
    inputs: Callable[[], Any],
    output_key: str,
    shape: Tuple[int, ...],
    unused: Sequence[str] = (),
    skips: Tuple[str, ...] = (),
    **attributes: Any,
) -> Case:
    """ModelTests on ``build``'s model called on ``inputs``, its ``output_key`` a batch of
    ``shape``; ``unused``: parameters these inputs do not reach; ``attributes``: the rest of
    the setUp."""
    setup = dict(
        model=shared(build),
        inputs=inputs,
        output_key=output_key,
        expected_output_shape=(BATCH, *shape),
        make_model=build,
        allowed_unchanged_parameters=list(unused),
        **attributes,
    )
    return (ModelTests, setup, skips)


def swept_sequence_model(
    build: Callable[[], nn.Module],
    inputs: Callable[[], Any],
    shape: Tuple[int, ...],
    causal: bool,
    output_key: str = "logits",
    padding_mask: str = "attention_mask",
    unused: Sequence[str] = (),
    skips: Tuple[str, ...] = (),
    **attributes: Any,
) -> Case:
    """SequenceModelTests on ``build``'s model, as swept_model, its positions along dimension
    1, its padding in ``padding_mask``; test_causality skips on a model not ``causal``."""
    _, setup, _ = swept_model(
        build,
        inputs,
        output_key,
        shape,
        unused,
        sequence_dim=1,
        causal=causal,
        padding_mask=padding_mask,
        **attributes,
    )
    return (SequenceModelTests, setup, skips if causal else (NOT_CAUSAL, *skips))


def masked_lm(kind: str, skips: Tuple[str, ...] = (), **config: Any) -> Case:
    """A masked language model as transformers builds it, on a right-padded batch."""
    build = _transformers(kind, "AutoModelForMaskedLM", **_TOKENS, **config)
    return swept_sequence_model(build, token_batch, (LENGTH, VOCAB), causal=False, skips=skips)


def image_to_text(decoder: Dict[str, Any]) -> Case:
    """A VisionEncoderDecoderModel: a ViT and ``decoder`` (a configuration), which reads the
    ViT's last hidden state (not its pooler) by cross-attention."""
    build = _transformers(
        "vision-encoder-decoder",
        "AutoModelForImageTextToText",
        encoder=dict(_VIT, model_type="vit"),
        decoder=dict(decoder, is_decoder=True, add_cross_attention=True),
        decoder_start_token_id=1,
        pad_token_id=0,
    )
    return swept_sequence_model(
        build,
        images_and_captions,
        (LENGTH, VOCAB),
        causal=True,
        padding_mask="decoder_attention_mask",
        sequence_inputs=["decoder_input_ids"],
        unused=["encoder.pooler.*"],
    )


def image_text_to_text(
    kind: str,
    inputs: Callable[[], Dict[str, torch.Tensor]],
    placeholders: int,
    causal: bool = True,
    unused: Sequence[str] = (),
    **config: Any,
) -> Case:
    """A multimodal language model as transformers builds it, on ``inputs`` with
    ``placeholders`` image tokens (IMAGE_TOKEN) before each text; its logits over the VOCAB + 1
    tokens of its text model."""
    build = _transformers(
        kind, "AutoModelForImageTextToText", image_token_index=IMAGE_TOKEN, **config
    )
    return swept_sequence_model(
        build,
        inputs,
        (placeholders + LENGTH, VOCAB + 1),
        causal,
        unused=unused,
    )


def forecaster(kind: str, model_class: str, positions: int, skips: Tuple[str, ...]) -> Case:
    """A transformers encoder-decoder forecaster on ``histories``, its encoder's last hidden
    state checked (``positions`` long), its loss, a mean over the batch, not compared per
    sample. It reads the values' lags over the whole history, its time features and mask
    over the context only: their first two steps are by design unread."""
    lags = (slice(None), slice(0, 2))
    return swept_model(
        _transformers(kind, model_class, **_FORECASTER),
        histories,
        "encoder_last_hidden_state",
        (positions, 16),
        skips=skips,
        cross_sample_outputs=["loss"],
        unread_inputs={"past_time_features": lags, "past_observed_mask": lags},
    )


#: The outputs that Informer's ProbSparse attention, sampling keys in every mode, changes by
#: amounts near rounding: which one a check names first depends on the seed.
_PROBSPARSE = (
    "output.loss",
    "output.params[0]",
    "output.params[1]",
    "output.params[2]",
    "output.encoder_last_hidden_state",
)

#: A sweep (three seeds) of more families: detection (DETR, YOLOS, RT-DETR), segmentation and
#: depth (Segformer, DPT, Depth Anything), multimodal models (LLaVA, BLIP-2, PaliGemma, vision
#: encoder-decoders), forecasters (PatchTST, Informer, TimeSeriesTransformer), audio codecs
#: (EnCodec, DAC), hybrid Mamba decoders (Zamba2, Falcon-H1), a protein model (ESM), masked
#: LMs (Perceiver, ModernBERT) and timm's NFNet, CSP, BiLSTM, cross-covariance, gating and
#: multi-resolution designs. Its false alarms (BLIP's in-place embeddings, BLIP-2's image
#: tokens filled across the batch, RT-DETR's top-k under autocast) are fixed, BLIP is in
#: DESIGN_ZOO; its setUp errors stay out (PaliGemma without token_type_ids, a forecaster's
#: unread time features not listed).
SWEPT_FAMILIES: Dict[str, Case] = {
    "transformers detr (object detection, ResNet backbone)": swept_model(
        _transformers(
            "detr",
            "AutoModelForObjectDetection",
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            backbone_config=dict(
                model_type="resnet",
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                layer_type="basic",
                out_features=["stage2"],
            ),
            **_two_stacks(1, 1, d_model=32, heads=2, ffn_dim=64),
            num_queries=6,
            num_labels=3,
        ),
        pixel_values(64),
        "logits",
        (6, 4),
        # its decoder queries start at zero: layer 0's self-attention values are v_proj(0)
        unused=["model.decoder.layers.0.self_attn.v_proj.weight"],
        # its backbone's BatchNorm is frozen (DetrFrozenBatchNorm2d, no F.batch_norm)
        skips=(NO_RUNNING_STATISTICS,),
    ),
    "transformers segformer (semantic segmentation)": swept_model(
        _transformers(
            "segformer",
            "AutoModelForSemanticSegmentation",
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=16,
            num_labels=5,
            drop_path_rate=0.1,
        ),
        pixel_values(),
        "logits",
        (5, 8, 8),
        skips=(differs_in_training("output.logits"),),  # stochastic depth
    ),
    "transformers patchtst (forecasting)": swept_model(
        _transformers(
            "patchtst",
            "PatchTSTForPrediction",
            num_input_channels=3,
            context_length=32,
            patch_length=8,
            patch_stride=8,
            prediction_length=6,
            d_model=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            ffn_dim=32,
        ),
        lambda: {"past_values": torch.randn(BATCH, 32, 3)},
        "prediction_outputs",
        (6, 3),
    ),
    "transformers perceiver (masked LM)": masked_lm(
        "perceiver",
        max_position_embeddings=LENGTH,
        d_model=32,
        num_latents=8,
        d_latents=32,
        num_self_attends_per_block=1,
        num_self_attention_heads=2,
        num_cross_attention_heads=2,
        # its decoder queries are max_position_embeddings fixed positions: one length only
        skips=("each padded sample alone, without its padding: not compared",),
    ),
    "transformers llava (CLIP vision, Llama, left padding)": image_text_to_text(
        "llava",
        lambda: with_position_ids(captioned_images(16, left_padding=True)),
        16,
        # vision_feature_layer=-1 reads the vision tower's last hidden state, before its
        # post_layernorm
        unused=["model.vision_tower.post_layernorm.*"],
        vision_config=dict(TINY_VIT, model_type="clip_vision_model", projection_dim=16),
        text_config=dict(_DECODER, **_WITH_IMAGE_TOKEN, model_type="llama"),
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    ),
    "transformers esm (protein encoder, rotary positions, token dropout)": swept_sequence_model(
        _transformers(
            "esm",
            "AutoModel",
            **_SMALL,
            vocab_size=33,
            pad_token_id=1,
            mask_token_id=32,
            max_position_embeddings=64,
            position_embedding_type="rotary",
            token_dropout=True,
        ),
        proteins,
        (10, 32),
        causal=False,
        output_key="last_hidden_state",
        unused=["contact_head.*"],  # used by predict_contacts only
    ),
    "transformers modernbert (masked LM, local and global attention)": masked_lm(
        "modernbert",
        **dict(_SMALL, num_hidden_layers=3),
        global_attn_every_n_layers=2,
        local_attention=4,
        max_position_embeddings=64,
    ),
    "transformers zamba2 (causal LM, Mamba2 and shared attention)": library_decoder(
        "zamba2",
        **dict(_HYBRID, num_hidden_layers=4),
        layers_block_type=["mamba", "hybrid"] * 2,
        attention_head_dim=8,
        use_mem_rope=True,
        mamba_headdim=8,
        chunk_size=8,
        adapter_rank=4,  # of its shared MLP's per-layer (LoRA-like) adapters
    ),
    "transformers falcon_h1 (causal LM, parallel Mamba2 and attention)": library_decoder(
        "falcon_h1",
        **_HYBRID,
        head_dim=8,
        mamba_n_heads=8,
        mamba_chunk_size=8,
        mamba_d_ssm=64,
    ),
    "transformers encodec (audio codec)": swept_model(
        encodec,
        waveforms,
        "audio_values",
        (1, 160),
        # its quantizer (an argmin; transformers has no straight-through estimator) passes no
        # gradient to the encoder
        unused=["encoder.*"],
    ),
    "transformers dpt (depth estimation)": swept_model(
        _transformers(
            "dpt",
            "AutoModelForDepthEstimation",
            **dict(_VIT, num_hidden_layers=4),
            **_DEPTH,
            backbone_out_indices=[0, 1, 2, 3],
            reassemble_factors=[4, 2, 1, 0.5],
        ),
        pixel_values(),
        "predicted_depth",
        (64, 64),
        # the neck reads the backbone's intermediate states (not its final layernorm); the
        # first fusion layer has no residual input, so its residual_layer1 is never called
        unused=["dpt.layernorm.*", "neck.fusion_stage.layers.0.residual_layer1.*"],
    ),
    "transformers vision-encoder-decoder (ViT, BERT decoder)": image_to_text(
        dict(_SMALL, **_TOKENS, model_type="bert")
    ),
    "transformers vision-encoder-decoder (ViT, TrOCR decoder)": image_to_text(
        dict(
            _TOKENS,
            model_type="trocr",
            d_model=32,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        )
    ),
    "transformers yolos (object detection, ViT with detection tokens)": swept_model(
        _transformers(
            "yolos",
            "AutoModelForObjectDetection",
            **dict(_VIT, image_size=[32, 32]),
            num_detection_tokens=5,
            num_labels=3,
        ),
        pixel_values(),
        "logits",
        (5, 4),
    ),
    "transformers rt_detr (object detection, hybrid encoder, deformable decoder)": swept_model(
        _transformers(
            "rt_detr",
            "AutoModelForObjectDetection",
            backbone_config=dict(
                _STAGES,
                model_type="rt_detr_resnet",
                embedding_size=8,
                layer_type="basic",
                out_features=["stage2", "stage3", "stage4"],
            ),
            use_pretrained_backbone=False,
            use_timm_backbone=False,
            encoder_in_channels=[16, 32, 64],
            encoder_hidden_dim=16,
            encode_proj_layers=[2],
            **_two_stacks(1, 1, d_model=16, heads=2, ffn_dim=32),
            num_queries=6,
            num_labels=3,
            decoder_n_points=2,
            num_feature_levels=3,
            decoder_in_channels=[16, 16, 16],
            num_denoising=0,
            anchor_image_size=None,
            eval_size=None,
        ),
        pixel_values(64),
        "logits",
        (6, 3),
    ),
    "transformers blip-2 (captioning, Q-Former, OPT)": image_text_to_text(
        "blip-2",
        lambda: captioned_images(4),
        4,
        vision_config=TINY_VIT,
        qformer_config=dict(
            _SMALL,
            **_TOKENS,
            num_attention_heads=2,
            encoder_hidden_size=32,
            cross_attention_frequency=1,
            max_position_embeddings=32,
        ),
        text_config=dict(_OPT, **_WITH_IMAGE_TOKEN, model_type="opt", bos_token_id=1),
        num_query_tokens=4,
    ),
    "transformers paligemma (SigLIP, Gemma, prefix LM)": image_text_to_text(
        "paligemma",
        prefixed_images,
        16,
        causal=False,  # its prefix attends both ways
        # no pooling head, as PaliGemma's checkpoints
        vision_config=dict(
            TINY_VIT, model_type="siglip_vision_model", projection_dim=32, vision_use_head=False
        ),
        text_config=dict(
            _DECODER, **_WITH_IMAGE_TOKEN, model_type="gemma", num_key_value_heads=1, head_dim=8
        ),
        projection_dim=32,
        hidden_size=32,
    ),
    "transformers informer (forecasting, ProbSparse attention)": forecaster(
        "informer",
        "InformerForPrediction",
        4,  # halved by its distilling convolution
        # its ProbSparse attention samples keys in every mode, its LayerDrop (0.1 by default)
        # drops layers in training
        (*map(samples_at_evaluation, _PROBSPARSE), *map(differs_in_training, _PROBSPARSE)),
    ),
    "transformers time_series_transformer (forecasting)": forecaster(
        "time_series_transformer",
        "TimeSeriesTransformerForPrediction",
        8,
        (differs_in_training("output.loss"),),  # LayerDrop (0.1 by default)
    ),
    "transformers dac (audio codec)": swept_model(
        audio_codec(
            "dac",
            encoder_hidden_size=8,
            downsampling_ratios=[2, 4],
            decoder_hidden_size=16,
            n_codebooks=2,
            codebook_dim=4,
        ),
        waveforms,
        "audio_values",
        (160,),
    ),
    "transformers depth_anything (depth estimation, DINOv2 backbone)": swept_model(
        _transformers(
            "depth_anything",
            "AutoModelForDepthEstimation",
            backbone_config=dict(
                _VIT,
                model_type="dinov2",
                num_hidden_layers=4,
                image_size=28,
                patch_size=7,
                out_features=["stage1", "stage2", "stage3", "stage4"],
                reshape_hidden_states=False,
            ),
            **_DEPTH,
            reassemble_hidden_size=32,
            patch_size=7,
            use_pretrained_backbone=False,
        ),
        pixel_values(28),
        "predicted_depth",
        (28, 28),
        # its mask token is read with a pretraining mask only; the first fusion layer has no
        # residual input
        unused=["backbone.embeddings.mask_token", "neck.fusion_stage.layers.0.residual_layer1.*"],
    ),
    "timm ECA-NFNet-L0": vision(_timm("eca_nfnet_l0")),
    "timm CS3DarkNet-S (CSP)": vision(_timm("cs3darknet_s")),
    "timm Sequencer2D-S (BiLSTM mixing)": vision(_timm("sequencer2d_s"), size=28),  # stride 7
    "timm XCiT nano (cross-covariance attention)": vision(
        _timm("xcit_nano_12_p16_224", img_size=32, drop_path_rate=0.1),
        skips=(differs_in_training("output"),),  # stochastic depth
    ),
    "timm gMLP tiny (spatial gating)": vision(_timm("gmlp_ti16_224", img_size=32)),
    "timm HRNet-W18 small (multi-resolution)": vision(_timm("hrnet_w18_small"), size=64),
}

#: torchvision's detection models: a list of images and a list of target dicts in, a list of
#: dicts (eval) or a dict of losses (training) out. Made a supported calling convention by
#: issue 20; their verdicts are recorded here and asserted by test_detection_models_pass.
DETECTION: Dict[str, Case] = {
    "torchvision Faster R-CNN MobileNetV3 320 FPN, images and targets": (
        ModelTests,
        dict(model=shared(faster_rcnn), inputs=detection_batch, make_model=faster_rcnn),
        (
            # the platform's: data-dependent operations on meta, nms without a bfloat16 kernel
            "in eval mode, the model uses an operation the meta device cannot run",
            "an operation of the model (torch.ops.torchvision.nms",
            # the design: a dict of losses in training, detections in eval
            "the model returns other outputs in training mode",
            # the design: images of several sizes padded to the largest of the batch
            *(
                f"sample {i}'s output[{i}]['boxes'] changes with the shapes of the other "
                "samples of the batch, not with their values"
                for i in range(4)
            ),
        ),
    ),
}


def design_case(mixin: type, attributes: Dict[str, Any], **class_attributes: Any) -> type:
    """A test class whose setUp sets ``attributes`` ("model" and "inputs" called)."""

    def set_up(self: Any) -> None:
        for name, value in attributes.items():
            setattr(self, name, value() if name in ("model", "inputs") else value)

    return make_case(mixin, set_up, **class_attributes)


#: The slower part of the zoo, run when DLTESTKIT_ZOO_EXTENDED is set (``--extended`` below).
extended = unittest.skipUnless(
    os.environ.get("DLTESTKIT_ZOO_EXTENDED"), "set DLTESTKIT_ZOO_EXTENDED=1 to run it"
)


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


@unittest.skipIf(MISSING, NEEDS)
def _third(zoo: Dict[str, Any], part: int) -> Dict[str, Any]:
    """The ``part``-th of three slices of ``zoo``, in its order."""
    labels = list(zoo)
    size = -(-len(labels) // 3)
    return {label: zoo[label] for label in labels[part * size : (part + 1) * size]}


class DesignZoo(CheckTestCase):
    """Every default check on every component: passes, or skips for an allowed reason."""

    def setUp(self) -> None:
        quiet_transformers()

    def assertEveryCheckPasses(self, zoo: Dict[str, Case]) -> None:
        for label, (mixin, attributes, skips) in zoo.items():
            case = design_case(mixin, attributes)
            model = attributes["model"]()
            before = {name: t.clone() for name, t in model.state_dict().items()}
            allowed = [NO_GPU, *skips]
            if not has_running_statistics(model):
                allowed.append(NO_RUNNING_STATISTICS)
            for name in checks_of(case):
                with self.subTest(label, check=name):
                    self.assertPasses(case, name, allowed_skips=allowed)
            if model is attributes["model"]():  # shared: the checks must not have changed it
                with self.subTest(label, check="the shared model is unchanged"):
                    after = model.state_dict()
                    self.assertEqual(list(after), list(before))
                    for name, tensor in before.items():
                        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)

    # the zoo in three parts, which pytest -n 2 runs side by side
    def test_every_check_passes_on_every_component_first_third(self) -> None:
        self.assertEveryCheckPasses(_third(DESIGN_ZOO, 0))

    def test_every_check_passes_on_every_component_second_third(self) -> None:
        self.assertEveryCheckPasses(_third(DESIGN_ZOO, 1))

    def test_every_check_passes_on_every_component_last_third(self) -> None:
        self.assertEveryCheckPasses(_third(DESIGN_ZOO, 2))

    def test_the_thirds_hold_the_whole_zoo(self) -> None:
        self.assertEqual(
            [label for part in range(3) for label in _third(DESIGN_ZOO, part)], list(DESIGN_ZOO)
        )

    def test_detection_models_pass(self) -> None:
        # issue 20's table: the contract refused a list of images and of target dicts
        self.assertEveryCheckPasses(DETECTION)

    def assertDataParallelPasses(self, check: str, allowed: Sequence[str]) -> None:
        """``check`` of DistributedModelTests on every component, BatchNorm's per-rank
        statistics declared, as the zoo's users would."""
        kept = ("model", "inputs", "unbatched_inputs", "loss_fn")
        for label, (_, attributes, _) in DESIGN_ZOO.items():
            chosen = {key: value for key, value in attributes.items() if key in kept}
            case = design_case(DistributedModelTests, dict(chosen, local_batch_statistics=["*"]))
            with self.subTest(label):
                self.assertPasses(case, check, allowed_skips=allowed)

    @pytest.mark.slow
    def test_ddp_gradients_pass_or_say_why_not_on_every_component(self) -> None:
        # sparse gradients (fastText) compared dense; sampling models skip saying so
        self.assertDataParallelPasses(
            "test_ddp_gradients",
            (
                "the model draws random numbers in eval mode",
                "the comparison trains the model in eval mode (its dropout off",  # RWKV
            ),
        )

    @pytest.mark.slow
    def test_fsdp_gradients_pass_or_say_why_not_on_every_component(self) -> None:
        # sampling models and models fully_shard cannot train with the default units (CLIP's
        # scalar logit_scale, sparse gradients, Mixtral's router logits recorded by module
        # hooks) skip saying so
        self.assertDataParallelPasses(
            "test_fsdp_gradients",
            (
                "the model draws random numbers in eval mode",
                "fully_shard cannot train the model with the default units",
                "the comparison trains the model in eval mode (its dropout off",  # RWKV
            ),
        )

    @extended
    def test_every_check_passes_on_the_extended_components(self) -> None:
        self.assertEveryCheckPasses(EXTENDED)

    @extended
    def test_every_check_passes_on_the_newer_architectures(self) -> None:
        self.assertEveryCheckPasses(NEWER_ARCHITECTURES)

    @extended
    def test_every_check_passes_on_the_swept_families(self) -> None:
        self.assertEveryCheckPasses(SWEPT_FAMILIES)

    @extended
    def test_the_gpu_comparison_passes_with_the_cpu_standing_in(self) -> None:
        # sampling models (compared by shape), BatchNorm, spectral norm, QAT observers
        for label, (mixin, attributes, _) in {**DESIGN_ZOO, **EXTENDED}.items():
            with self.subTest(label):
                case = design_case(mixin, dict(attributes, accelerators=["cpu"]))
                self.assertPasses(case, "test_device_moving_on_gpu", allowed_skips=())


@unittest.skipIf(MISSING, NEEDS)
class DesignFalseAlarms(CheckTestCase):
    """One test per false alarm (issue 20's table and the ones this zoo found)."""

    def setUp(self) -> None:
        quiet_transformers()

    def assertCheckPasses(self, label: str, check: str) -> None:
        mixin, attributes, skips = {**DESIGN_ZOO, **DETECTION}[label]
        self.assertPasses(design_case(mixin, attributes), check, allowed_skips=[NO_GPU, *skips])

    def assertCheckSkipsWith(self, label: str, check: str, *fragments: str) -> None:
        """No failure; the check (or one of its parts) skips, saying what it saw and the
        option that makes it strict."""
        mixin, attributes, _ = DESIGN_ZOO[label]
        self.assertSkipsWith(design_case(mixin, attributes), check, *fragments)

    # issue 20's table
    def test_a_vae_sampling_in_eval_mode_is_reported_by_eval_determinism(self) -> None:
        # mu + eps * std with torch.randn_like in both modes: explicit sampling, by design
        self.assertCheckSkipsWith(
            "PyTorch examples/vae VAE (samples in both modes)",
            "test_eval_deterministic",
            "torch.randn_like in ExamplesVAE",
            "in reparameterize",
            "deterministic_eval = True",
        )

    def test_clip_with_output_key_passes_batch_independence(self) -> None:
        # logits_per_image and logits_per_text compare every image with every text
        for key in ("text_embeds", "image_embeds"):
            with self.subTest(output_key=key):
                self.assertCheckPasses(
                    f"transformers CLIPModel, output_key='{key}'", "test_batch_independence"
                )

    def test_mixture_of_experts_models_pass_dtype_moving(self) -> None:
        # grouped matmul (torch._grouped_mm) has no float64 kernel on the CPU: a skipped part
        for label in (
            "transformers Mixtral, causal LM, left padding",
            "transformers Qwen2-MoE, causal LM, left padding",
            "transformers Mixtral, called with labels and output_router_logits (aux loss)",
        ):
            with self.subTest(label):
                self.assertCheckSkipsWith(
                    label, "test_dtype_moving", "torch._grouped_mm in", "torch.float64"
                )

    def test_mixture_of_experts_models_pass_device_moving(self) -> None:
        # the meta kernel of the grouped matmul refuses float32
        for label in (
            "transformers Mixtral, causal LM, left padding",
            "transformers Qwen2-MoE, causal LM, left padding",
            "transformers Mixtral, called with labels and output_router_logits (aux loss)",
        ):
            with self.subTest(label):
                self.assertCheckPasses(label, "test_device_moving")

    def test_state_space_models_upcasting_their_logits_pass_dtype_moving(self) -> None:
        # MambaForCausalLM's deliberate logits.float()
        for label in (
            "transformers Mamba, causal LM, left padding",
            "transformers Mamba2, causal LM, left padding",
        ):
            with self.subTest(label):
                self.assertCheckPasses(label, "test_dtype_moving")

    # found by this zoo
    def test_clip_without_output_key_passes_output_shape(self) -> None:
        # logits_per_image is (images, texts): both dimensions follow the batch size
        self.assertCheckPasses(
            "transformers CLIPModel, output_key unset (logits_per_image)", "test_output_shape"
        )

    def test_clip_without_output_key_is_reported_by_batch_independence(self) -> None:
        # the checked output is a similarity matrix: nothing to fail, the option named
        self.assertCheckSkipsWith(
            "transformers CLIPModel, output_key unset (logits_per_image)",
            "test_batch_independence",
            "compares pairs of samples",
            "cross_sample_outputs",
        )

    def test_vitmae_random_masking_is_reported_by_eval_determinism(self) -> None:
        # torch.rand noise, argsorted, in every mode (pass noise= to fix it)
        self.assertCheckSkipsWith(
            "transformers ViTMAE (random masking in every mode)",
            "test_eval_deterministic",
            "torch.rand in embeddings (ViTMAEEmbeddings)",
            "deterministic_eval = True",
        )

    def test_vitmae_float32_mask_is_reported_by_dtype_moving(self) -> None:
        # its 0/1 mask output is made by torch.ones without dtype= in random_masking, and
        # no computation of the model flows into it: a constant, named, not a failure
        self.assertCheckSkipsWith(
            "transformers ViTMAE (random masking in every mode)",
            "test_dtype_moving",
            "returns output.mask (torch.float32, made by torch.ones without dtype= in "
            "embeddings (ViTMAEEmbeddings), at modeling_vit_mae.py:",
            "strict_output_dtypes = True",
        )

    def test_a_policy_sampling_its_action_is_reported_by_eval_determinism(self) -> None:
        # Categorical(logits=...).sample(): torch.multinomial in eval mode, by design
        self.assertCheckSkipsWith(
            "policy that samples its action (every mode)",
            "test_eval_deterministic",
            "torch.multinomial in Policy",
            "deterministic_eval = True",
        )

    def test_logits_upcast_with_float_pass_dtype_moving(self) -> None:
        self.assertCheckPasses("logits upcast with .float()", "test_dtype_moving")

    def test_sparse_embedding_gradients_are_checked(self) -> None:
        # nn.EmbeddingBag(sparse=True): its gradient is a sparse tensor
        for check in ("test_all_parameters_updated", "test_finite_outputs_and_gradients"):
            with self.subTest(check=check):
                self.assertCheckPasses("sparse EmbeddingBag (fastText)", check)

    def test_sparse_embedding_gradients_pass_ddp(self) -> None:
        # DDP's all-reduce lists a sparse gradient's entries otherwise than one process's
        # backward (32 entries, uncoalesced, against 30): the same gradient, compared dense
        _, attributes, _ = DESIGN_ZOO["sparse EmbeddingBag (fastText)"]
        kept = {key: attributes[key] for key in ("model", "inputs")}
        self.assertPasses(design_case(DistributedModelTests, kept), "test_ddp_gradients")

    def test_quantisation_aware_training_is_reported_by_dtype_moving(self) -> None:
        # the fused fake-quantize kernel takes float32 only: a limit of the platform
        self.assertCheckSkipsWith(
            "quantisation-aware training (prepare_qat)",
            "test_dtype_moving",
            "torch.fused_moving_avg_obs_fake_quant in 0.activation_post_process",
            # called by a hook torch installed: no user frame, so torch's line is named
            "(FusedMovingAvgObsFakeQuantize), at torch/ao/quantization/fake_quantize.py:",
            "cannot run in torch.bfloat16 on this platform",
        )

    def test_routing_with_torch_where_is_checked_on_meta(self) -> None:
        # torch.where(chosen == e), the one-argument form of nonzero: no meta kernel
        self.assertCheckPasses(
            "hand-written top-2 MoE layer with a load-balancing loss", "test_device_moving"
        )

    # issue 22: the training-mode checks
    def test_attention_dropout_read_from_dropout_p_is_no_false_alarm(self) -> None:
        # eager attention calls F.dropout(weights, p=module.attn_dropout.p, ...): the
        # attention Dropout modules are never called, the dropout still switched off
        from transformers import BertModel, GPT2LMHeadModel

        eager = {"attn_implementation": "eager"}
        for build in (
            lambda: GPT2LMHeadModel(gpt2_config(bos_token_id=0, eos_token_id=0, **eager)),
            lambda: BertModel(bert_config(**eager)),
        ):
            case = design_case(ModelTests, dict(model=build, inputs=token_batch))
            self.assertPasses(case, "test_train_matches_eval")

    def test_spec_augment_is_reported_by_train_matches_eval(self) -> None:
        self.assertCheckSkipsWith(
            "transformers wav2vec2, raw audio",
            "test_train_matches_eval",
            "the model computes differently in training mode by design: ",
            "NumPy's global generator (np.random) drawn from in training only",
        )

    def test_gradients_through_checkpointed_batch_norm_are_taken_in_eval_mode(self) -> None:
        # torch.utils.checkpoint runs a memory-efficient DenseNet layer again during the
        # backward pass: taken after the eval-mode pass had put the model back in training
        # mode, it raised (other saved tensors) and updated the user's running statistics
        model = torchvision_densenet()
        before = {name: t.clone() for name, t in model.state_dict().items()}
        case = design_case(
            ModelTests,
            dict(model=lambda: model, inputs=images, expected_output_shape=(BATCH, 10)),
        )
        for name in ("test_batch_independence", "test_all_inputs_used"):
            with self.subTest(name):
                self.assertPasses(case, name)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)

    def test_a_device_chosen_for_meta_by_long_t5_skips_naming_it(self) -> None:
        self.assertCheckSkipsWith(
            "transformers LongT5, transient-global attention",
            "test_device_moving",
            "made by torch.arange given device=None",
            "at modeling_longt5.py:",
            "a device the model chose (device=None passed explicitly",
        )

    def test_attention_over_one_position_at_a_small_input_skips_naming_it(self) -> None:
        # (every check on it: in the extended zoo)
        mixin, attributes, _ = EXTENDED[
            "timm LeViT on 64 x 64 images (its last stage attends over one position)"
        ]
        self.assertSkipsWith(
            design_case(mixin, attributes),
            "test_all_parameters_updated",
            "exactly zero gradients at the size of self.inputs",
            "Tensor.softmax at levit.py:",
            "(a softmax over a dimension of size 1 (dim=-1) is constant)",
            "attn.attention_biases",
        )

    def test_a_pooling_that_cancels_over_one_position_skips_naming_both_sizes(self) -> None:
        # (every check on it: in the extended zoo)
        mixin, attributes, _ = EXTENDED[
            "timm PoolFormer on 32 x 32 images (its last stage pools over one position)"
        ]
        self.assertSkipsWith(
            design_case(mixin, attributes),
            "test_all_parameters_updated",
            CANCELS_AT_THIS_SIZE + " 32 x 32), in every step, of 6 parameters",
            "stages.3.blocks.0.norm1.weight",
            "which get gradients on images twice as large (64 x 64)",
        )

    def test_rwkv_whose_eval_pass_has_no_gradients_is_judged_by_values(self) -> None:
        label = "transformers RWKV, causal LM (its state updated in place at evaluation)"
        for check, how in (
            ("test_batch_independence", "compared by values only"),
            ("test_all_inputs_used", "judged as a whole, by values"),
            ("test_causality", "causality was judged by values only"),
        ):
            with self.subTest(check):
                self.assertCheckSkipsWith(label, check, GRADIENTS_REFUSED, how)

    def test_reformer_whose_backward_pass_refuses_eval_mode_is_judged_by_values(self) -> None:
        label = "transformers Reformer, reversible layers and LSH attention"
        for check, how in (
            ("test_batch_independence", "compared by values only"),
            ("test_all_inputs_used", "judged as a whole, by values"),
            ("test_padding_invariance", "by values"),
        ):
            with self.subTest(check):
                self.assertCheckSkipsWith(
                    label,
                    check,
                    GRADIENTS_REFUSED,
                    "the model's own backward code raises AssertionError: If you want to "
                    "train `ReformerModel`",
                    "at modeling_reformer.py:",
                    how,
                )

    def test_batch_norm_kept_in_eval_mode_is_frozen_by_design(self) -> None:
        self.assertCheckSkipsWith(
            "frozen backbone under torch.no_grad (linear probe)",
            "test_running_statistics",
            "backbone.bn1 (BatchNorm2d) (kept in eval mode when the model is in training mode)",
        )

    def test_routing_with_torch_where_is_checked_on_meta_by_the_first_check(self) -> None:
        # the first check of a process: what runs once per process in its CPU pass must not
        # change which operations the meta pass is matched with
        tests = Path(__file__).resolve().parent
        script = (
            f"import sys; sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]\n"
            "from checkrunner import run_check\n"
            "import test_zoo_design as zoo\n"
            "mixin, attributes, _ = zoo.DESIGN_ZOO[sys.argv[1]]\n"
            "outcome = run_check(zoo.design_case(mixin, attributes), 'test_device_moving')\n"
            "print(outcome.failures + outcome.errors + outcome.skips)\n"
        )
        label = "hand-written top-2 MoE layer with a load-balancing loss"
        run = subprocess.run(
            [sys.executable, "-c", script, label],
            capture_output=True,
            text=True,
            cwd=tests.parent,
            timeout=300,
        )
        self.assertEqual((run.returncode, run.stdout.strip()), (0, "[]"), run.stderr[-3000:])


def every_seed(
    seeds: Sequence[int], with_extended: bool = False, pytest_arguments: Sequence[str] = ()
) -> int:
    """Run this file under pytest once per seed (``DLTESTKIT_TEST_SEED``), the extended part
    too if asked; the number of seeds that failed."""
    failed = 0
    for seed in seeds:
        print(f"--- DLTESTKIT_TEST_SEED={seed}", flush=True)
        command = [sys.executable, "-m", "pytest", __file__, "-q", "-n", "0", *pytest_arguments]
        environment = {**os.environ, "DLTESTKIT_TEST_SEED": str(seed)}
        if with_extended:
            environment["DLTESTKIT_ZOO_EXTENDED"] = "1"
        failed += (
            subprocess.run(command, env=environment, cwd=Path(__file__).parents[1]).returncode != 0
        )
    return failed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seeds"]:
        arguments = sys.argv[2:]
        seeds = [int(argument) for argument in arguments if argument.isdigit()]
        sys.exit(every_seed(seeds, with_extended="--extended" in arguments))
    unittest.main()
