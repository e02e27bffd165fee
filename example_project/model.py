"""Small variational autoencoders for 1x32x32 images in [-1, 1].

``VAE`` is the base class: an encoder network feeding two linear heads
(``mu`` and ``log_sigma`` of a diagonal Gaussian), the reparameterised
bottleneck, and a decoder network ending in ``tanh``. ``MLPVAE`` and
``CNNVAE`` only build the encoder and decoder networks.

Sampling: in training mode ``bottleneck`` draws
``z = mu + exp(log_sigma) * eps`` with ``eps ~ N(0, 1)``; in eval mode it
returns ``mu``, so ``model.eval()`` makes the model deterministic (for
evaluation and reconstructions).

The activations are LeakyReLU rather than ReLU so that no unit is ever dead
for a whole batch: every parameter gets a gradient from every batch.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

__all__ = ["CNNVAE", "MLPVAE", "VAE"]


class VAE(nn.Module):
    """Encoder -> (mu, log_sigma) -> sample -> decoder.

    Args:
        encoder: maps a batch of inputs to features of shape (batch, feature_dim).
        decoder: maps latents (batch, bottleneck_dim) to outputs shaped like the inputs.
        feature_dim: size of the encoder's features.
        bottleneck_dim: size of the latent space.
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, feature_dim: int, bottleneck_dim: int
    ) -> None:
        super().__init__()
        self.bottleneck_dim = bottleneck_dim
        self.encoder = encoder
        self.mu = nn.Linear(feature_dim, bottleneck_dim)
        self.log_sigma = nn.Linear(feature_dim, bottleneck_dim)
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mu, log_sigma)``, each of shape (batch, bottleneck_dim)."""
        features = self.encoder(x)
        return self.mu(features), self.log_sigma(features)

    def bottleneck(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Sample ``mu + exp(log_sigma) * eps`` in training mode; return ``mu`` in eval mode."""
        if not self.training:
            return mu
        # randn_like: the noise follows mu's device and dtype (also on "meta").
        return mu + torch.exp(log_sigma) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents to reconstructions in [-1, 1]."""
        return self.decoder(z)

    def forward_with_latent(
        self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, mu, log_sigma)``; the trainer needs all three."""
        mu, log_sigma = self.encode(x)
        return self.decode(self.bottleneck(mu, log_sigma)), mu, log_sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction only, shaped like ``x``."""
        return self.forward_with_latent(x)[0]


class MLPVAE(VAE):
    """Fully connected VAE: flatten -> 256 -> 128 -> latent -> 128 -> 256 -> image."""

    def __init__(
        self, input_shape: Sequence[int], bottleneck_dim: int, hidden: Sequence[int] = (256, 128)
    ) -> None:
        input_shape = tuple(input_shape)
        num_inputs = math.prod(input_shape)
        encoder = _mlp([num_inputs, *hidden], flatten=True)
        decoder = nn.Sequential(
            _mlp([bottleneck_dim, *reversed(hidden)]),
            nn.Linear(hidden[0], num_inputs),
            nn.Unflatten(1, input_shape),
            nn.Tanh(),  # last: its output is a tensor of its own, not a view (FSDP2 warns of
            # a view returned by a sharded module, which an in-place op would cut off)
        )
        super().__init__(encoder, decoder, hidden[-1], bottleneck_dim)
        self.input_shape = input_shape


class CNNVAE(VAE):
    """Convolutional VAE: three stride-2 convolutions (16/32/64 channels) and
    three stride-2 transposed convolutions back. Height and width must be
    divisible by 8 (e.g. (1, 32, 32))."""

    def __init__(
        self,
        input_shape: Sequence[int],
        bottleneck_dim: int,
        channels: Sequence[int] = (16, 32, 64),
    ) -> None:
        input_shape = tuple(input_shape)
        in_channels, height, width = input_shape
        scale = 2 ** len(channels)
        if height % scale or width % scale:
            raise ValueError(f"height and width must be divisible by {scale}, got {input_shape}")
        feature_shape = (channels[-1], height // scale, width // scale)
        feature_dim = math.prod(feature_shape)

        encoder_layers: list = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            encoder_layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1),
                nn.LeakyReLU(0.2),
            ]
        # flattened before the last activation, whose output is then a tensor of its own, not
        # a view (FSDP2 warns of a view returned by a sharded module)
        encoder_layers.insert(-1, nn.Flatten())
        encoder = nn.Sequential(*encoder_layers)

        decoder_layers: list = [
            nn.Linear(bottleneck_dim, feature_dim),
            nn.LeakyReLU(0.2),
            nn.Unflatten(1, feature_shape),
        ]
        reversed_channels = (*reversed(channels), in_channels)
        for i, (c_in, c_out) in enumerate(zip(reversed_channels[:-1], reversed_channels[1:])):
            decoder_layers.append(
                nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
            )
            decoder_layers.append(nn.LeakyReLU(0.2) if i < len(channels) - 1 else nn.Tanh())
        decoder = nn.Sequential(*decoder_layers)

        super().__init__(encoder, decoder, feature_dim, bottleneck_dim)
        self.input_shape = input_shape


def _mlp(sizes: Sequence[int], flatten: bool = False) -> nn.Sequential:
    """Linear + LeakyReLU layers through ``sizes`` (optionally flattening first)."""
    layers: list = [nn.Flatten()] if flatten else []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)
