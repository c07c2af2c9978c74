"""The shared encoder and the per-identity decoder.

Only plain convs, linears, PixelShuffle and pointwise activations are used, so both
networks run unchanged with channels_last tensors and under CUDA bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import InvalidInputError

__all__ = [
    "Decoder",
    "Encoder",
    "LatentCritic",
    "build_decoder",
    "build_encoder",
    "build_latent_critic",
    "count_parameters",
]

# faceswap and DeepFaceLab both use LeakyReLU(0.1) in their conv blocks.
_SLOPE = 0.1
_RES_SLOPE = 0.2


class _Downscale(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=2, padding=kernel // 2)
        self.act = nn.LeakyReLU(_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class _Upscale(nn.Module):
    """Conv to 4x channels then PixelShuffle(2): sub-pixel upsampling without the
    checkerboard of transposed convs (given the ICNR init in ``_init_weights``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout * 4, 3, padding=1)
        self.act = nn.LeakyReLU(_SLOPE)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.act(self.conv(x)))


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.LeakyReLU(_RES_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.act(self.conv1(x)))
        return self.act(x + y)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _init_weights(module: nn.Module, generator: torch.Generator | None) -> None:
    """He init for convs, ICNR for the sub-pixel convs, Glorot for dense and output layers
    (the faceswap recipe). Takes an explicit generator so building a seeded network never
    touches the global RNG."""
    for m in module.modules():
        if isinstance(m, _Upscale):
            w = m.conv.weight
            # ICNR: every group of 4 outputs that PixelShuffle interleaves into one 2x2
            # block starts identical, so the first upscale is a nearest-neighbour resize.
            base = torch.empty((w.shape[0] // 4, *w.shape[1:]), dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(base, a=_SLOPE, nonlinearity="leaky_relu", generator=generator)
            with torch.no_grad():
                w.copy_(base.repeat_interleave(4, dim=0))
                if m.conv.bias is not None:
                    m.conv.bias.zero_()
        elif isinstance(m, (_Downscale, _ResBlock)):
            for conv in m.children():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_uniform_(
                        conv.weight, a=_SLOPE, nonlinearity="leaky_relu", generator=generator
                    )
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    # Output convs are direct children of the decoder; handled by the caller.


class Encoder(nn.Module):
    """Aligned face (N,3,R,R) in [0,1] RGB -> latent (N, *config.latent_shape)."""

    def __init__(self, config: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        stages: list[nn.Module] = []
        cin = 3
        for cout in config.encoder_dims:
            stages.append(_Downscale(cin, cout, config.encoder_kernel))
            cin = cout
        self.down = nn.Sequential(*stages)
        s = config.dense_size
        self.dense1 = nn.Linear(cin * s * s, config.bottleneck_dims)
        self.dense2 = nn.Linear(config.bottleneck_dims, config.dense_channels * s * s)
        self.up = _Upscale(config.dense_channels, config.latent_channels)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if any(p.is_meta for p in self.parameters()):
            return
        _init_weights(self, generator)

    def forward(self, x: Tensor) -> Tensor:
        channels_last = _is_channels_last(x)
        h = self.down(x)
        # flatten() follows the logical NCHW order whatever the memory format, so the
        # dense weights mean the same thing with and without channels_last.
        h = self.dense2(self.dense1(h.flatten(1)))
        s = self.config.dense_size
        h = h.view(h.shape[0], self.config.dense_channels, s, s)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.up(h)


class Decoder(nn.Module):
    """Latent -> (rgb (N,3,R,R) in [0,1], mask (N,1,R,R) in [0,1] or None)."""

    def __init__(self, config: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        cin = config.latent_channels
        stages: list[nn.Module] = []
        for cout in config.decoder_dims:
            blocks: list[nn.Module] = [_Upscale(cin, cout)]
            blocks += [_ResBlock(cout) for _ in range(config.decoder_res_blocks)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        k = config.out_kernel
        self.rgb = nn.Conv2d(cin, 3, k, padding=k // 2)
        self.mask_stages: nn.Sequential | None = None
        self.mask_out: nn.Conv2d | None = None
        if config.mask_head:
            cin = config.latent_channels
            mstages: list[nn.Module] = []
            for cout in config.mask_dims:
                mstages.append(_Upscale(cin, cout))
                cin = cout
            self.mask_stages = nn.Sequential(*mstages)
            self.mask_out = nn.Conv2d(cin, 1, k, padding=k // 2)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if any(p.is_meta for p in self.parameters()):
            return
        _init_weights(self, generator)
        for conv in (self.rgb, self.mask_out):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight, generator=generator)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        rgb = torch.sigmoid(self.rgb(self.stages(z)))
        mask: Tensor | None = None
        if self.mask_stages is not None and self.mask_out is not None:
            mask = torch.sigmoid(self.mask_out(self.mask_stages(z)))
        return rgb, mask


class LatentCritic(nn.Module):
    """Latent (N, *config.latent_shape) -> (N, identities) logits: which identity's face the
    encoder saw. Training only: the encoder learns to leave it guessing, so the latent keeps
    pose, expression and light but little of who the face was, and every identity's decoder
    sees the same kind of latent at swap time as in training."""

    def __init__(
        self,
        config: ModelConfig,
        identities: int,
        *,
        hidden: int = 64,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if identities < 2:
            raise InvalidInputError(
                f"a latent critic tells identities apart: needs >= 2, got {identities}"
            )
        c, s, _ = config.latent_shape
        half = (s + 1) // 2
        self.net = nn.Sequential(
            nn.Conv2d(c, hidden, 3, stride=2, padding=1),
            nn.LeakyReLU(_SLOPE),
            nn.Flatten(),
            nn.Linear(hidden * half * half, 128),
            nn.LeakyReLU(_SLOPE),
            nn.Linear(128, identities),
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if any(p.is_meta for p in self.parameters()):
            return
        for m in self.net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(
                    m.weight, a=_SLOPE, nonlinearity="leaky_relu", generator=generator
                )
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def build_encoder(config: ModelConfig, seed: int | None = None) -> Encoder:
    """A freshly initialised CPU encoder; with ``seed`` the weights are reproducible and
    the global RNG is left untouched."""
    # Built on the meta device first: torch's layers would otherwise run their own default
    # init (drawing from the global RNG) just before ours replaces it.
    with torch.device("meta"):
        encoder = Encoder(config)
    encoder = encoder.to_empty(device="cpu")
    encoder.reset_parameters(_generator(seed))
    return encoder


def build_decoder(config: ModelConfig, seed: int | None = None) -> Decoder:
    """A freshly initialised CPU decoder; ``seed`` as for ``build_encoder``."""
    with torch.device("meta"):
        decoder = Decoder(config)
    decoder = decoder.to_empty(device="cpu")
    decoder.reset_parameters(_generator(seed))
    return decoder


def build_latent_critic(
    config: ModelConfig, identities: int, seed: int | None = None
) -> LatentCritic:
    """A freshly initialised CPU critic over ``identities`` classes; ``seed`` as above."""
    with torch.device("meta"):
        critic = LatentCritic(config, identities)
    critic = critic.to_empty(device="cpu")
    critic.reset_parameters(_generator(seed))
    return critic


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
