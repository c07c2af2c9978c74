"""Architecture description shared by the encoder, the decoders and their checkpoints.

A ``ModelConfig`` is stored inside every checkpoint, so a checkpoint alone is enough to
rebuild its network; everything here must therefore stay JSON-safe and strictly validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .errors import CheckpointError, InvalidInputError

__all__ = ["PRESETS", "ModelConfig", "get_preset"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of one shared encoder and the per-identity decoders that fit it.

    Encoder: ``len(encoder_dims)`` strided convs halve the image down to ``dense_size``;
    flatten; Dense ``bottleneck_dims``; Dense back to ``dense_channels x dense_size^2``;
    one 2x upscale to the latent ``(latent_channels, 2*dense_size, 2*dense_size)``.
    Decoder: one 2x upscale per ``decoder_dims`` entry (each followed by
    ``decoder_res_blocks`` residual blocks), an RGB conv, and, when ``mask_dims`` is not
    empty, a separate upscale chain ending in a one-channel mask.
    """

    name: str
    resolution: int
    encoder_dims: tuple[int, ...]
    bottleneck_dims: int
    dense_channels: int
    latent_channels: int
    decoder_dims: tuple[int, ...]
    encoder_kernel: int = 5
    decoder_res_blocks: int = 0
    mask_dims: tuple[int, ...] = ()
    out_kernel: int = 5

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def dense_size(self) -> int:
        return self.resolution >> len(self.encoder_dims)

    @property
    def latent_size(self) -> int:
        return self.dense_size * 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def mask_head(self) -> bool:
        return len(self.mask_dims) > 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Rebuild from ``to_dict`` output; anything malformed is a CheckpointError,
        because configs arrive from checkpoint headers that may be damaged or foreign."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            # Strict on purpose: an unknown field may change the architecture, and
            # silently ignoring it would build a network that does not match the weights.
            raise CheckpointError(f"model config has unknown field(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            if name not in data:
                if f.default is not MISSING:
                    continue
                raise CheckpointError(f"model config is missing field {name!r}")
            value = data[name]
            if name == "name":
                if not isinstance(value, str):
                    raise CheckpointError("model config field 'name' must be a string")
                kwargs[name] = value
            elif name.endswith("_dims") and name != "bottleneck_dims":
                if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                    raise CheckpointError(
                        f"model config field {name!r} must be a list of integers, got {value!r}"
                    )
                kwargs[name] = tuple(int(v) for v in value)
            else:
                if not _is_int(value):
                    raise CheckpointError(
                        f"model config field {name!r} must be an integer, got {value!r}"
                    )
                kwargs[name] = int(value)
        try:
            return cls(**kwargs)
        except InvalidInputError as exc:
            raise CheckpointError(f"invalid model config: {exc}") from exc


def _is_int(value: object) -> bool:
    # bool is an int subclass; a JSON `true` where a width belongs is garbage.
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(c: ModelConfig) -> None:
    def fail(msg: str) -> None:
        raise InvalidInputError(f"model config {c.name!r}: {msg}")

    if not isinstance(c.name, str) or not c.name:
        fail("name must be a non-empty string")
    for name in ("resolution", "bottleneck_dims", "dense_channels", "latent_channels"):
        value = getattr(c, name)
        if not _is_int(value) or value <= 0:
            fail(f"{name} must be a positive integer, got {value!r}")
    for name in ("encoder_kernel", "out_kernel"):
        value = getattr(c, name)
        if not _is_int(value) or value <= 0 or value % 2 == 0:
            fail(f"{name} must be a positive odd integer, got {value!r}")
    if not _is_int(c.decoder_res_blocks) or c.decoder_res_blocks < 0:
        fail(f"decoder_res_blocks must be >= 0, got {c.decoder_res_blocks!r}")
    for name in ("encoder_dims", "decoder_dims", "mask_dims"):
        dims = getattr(c, name)
        if not isinstance(dims, tuple) or not all(_is_int(d) and d > 0 for d in dims):
            fail(f"{name} must be a tuple of positive integers, got {dims!r}")
    if not c.encoder_dims:
        fail("encoder_dims must not be empty")
    if not c.decoder_dims:
        fail("decoder_dims must not be empty")
    if c.resolution > 4096:
        fail(f"resolution {c.resolution} is beyond any sensible face crop")
    if c.resolution % (1 << len(c.encoder_dims)) != 0 or c.dense_size < 1:
        fail(
            f"resolution {c.resolution} is not divisible by 2**{len(c.encoder_dims)} "
            "(one halving per encoder stage)"
        )
    decoded = c.latent_size << len(c.decoder_dims)
    if decoded != c.resolution:
        fail(
            f"decoder upscales the {c.latent_size}px latent to {decoded}px, "
            f"not the {c.resolution}px resolution"
        )
    if c.mask_dims and len(c.mask_dims) != len(c.decoder_dims):
        fail(
            f"mask_dims needs one entry per decoder stage ({len(c.decoder_dims)}), "
            f"got {len(c.mask_dims)}"
        )


PRESETS: dict[str, ModelConfig] = {
    # faceswap "original": 64 px, 4 strided convs, 1024-wide dense, 8x8x512 latent.
    "original64": ModelConfig(
        name="original64",
        resolution=64,
        encoder_dims=(128, 256, 512, 1024),
        bottleneck_dims=1024,
        dense_channels=1024,
        latent_channels=512,
        decoder_dims=(256, 128, 64),
        out_kernel=5,
    ),
    # DeepFaceLab "DF"-like: e_dims 64, ae_dims 256, d_dims 64, d_mask_dims 22.
    "df128": ModelConfig(
        name="df128",
        resolution=128,
        encoder_dims=(64, 128, 256, 512),
        bottleneck_dims=256,
        dense_channels=512,
        latent_channels=256,
        decoder_dims=(512, 256, 128),
        decoder_res_blocks=1,
        mask_dims=(176, 88, 44),
        out_kernel=1,
    ),
    # The original64 layout at small widths: tests and the 2-minute CPU demo.
    "tiny": ModelConfig(
        name="tiny",
        resolution=64,
        encoder_dims=(16, 32, 64, 96),
        bottleneck_dims=128,
        dense_channels=64,
        latent_channels=64,
        decoder_dims=(48, 32, 16),
        mask_dims=(16, 8, 8),
        out_kernel=5,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        ) from None
