"""Library-level training of one shared encoder and one decoder per identity.

Every step draws a batch per identity, augments it, runs all identities through the
shared encoder in one pass, decodes each with its own decoder and sums the per-identity
reconstruction losses. With ``encoder_lr == 0`` the encoder is frozen and only the
decoders learn: how a new identity is added to a deployed encoder.

With ``latent_adversary > 0`` (and a trained encoder, >= 2 identities) a small critic
learns each step to tell the identities apart from the latent, and the encoder is also
trained to leave it guessing. A swap feeds B's decoder the latent of A's face; the less that
latent says about A, the closer it is to the latents B's decoder learned from.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import AugmentConfig, make_training_pair
from .errors import InvalidInputError, PreconditionError
from .losses import LossWeights, identity_confusion, loss_terms
from .networks import Decoder, Encoder, LatentCritic, build_latent_critic
from .pixels import images_to_unit, to_unit

__all__ = ["Progress", "TrainConfig", "Trainer", "mean_latent"]

TOTAL = "total"
# The critic keeps one rate whatever the job's: it must keep up with the encoder from the
# first steps to the last, where the job's cosine schedule has all but stopped the encoder.
CRITIC_LR = 1e-3


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 16  # per identity
    lr: float = 5e-5  # faceswap's default
    encoder_lr: float | None = None  # None: same as lr; 0: encoder frozen
    betas: tuple[float, float] = (0.5, 0.999)  # faceswap's Adam betas
    warp: bool = True
    seed: int = 0
    log_every: int = 50
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    masked_loss: bool = True  # with masks, the RGB loss only counts inside the face
    grad_clip: float | None = None
    # "cosine" anneals every group's lr to min_lr_ratio of its start over `steps`: a short
    # run ends sharper than at a constant rate.
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.02
    # Linear ramp from ~0 to the full rate over the first steps: Adam's first updates, before
    # its second-moment estimate settles, are what throw a high-lr run into saturation.
    warmup_steps: int = 0
    autocast: bool = True  # bf16 autocast on CUDA; never used on CPU (far slower there)
    # Weight of the identity-confusion term (see the module docstring); 0: no critic.
    latent_adversary: float = 0.0
    # With a frozen encoder: each latent moved by u * (mean latent of another person - mean
    # latent of its own), u uniform in [0, identity_shift], the other person drawn from the
    # other identities trained here and any ``extra_latent_means``. A frozen encoder's latent
    # says much about who the face is; the shift shows each decoder its person's face in
    # latents that sit where other people's do, which is what a swap hands it.
    identity_shift: float = 0.0
    channels_last: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise InvalidInputError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInputError(f"lr must be a positive number, got {self.lr!r}")
        if self.encoder_lr is not None and not (
            self.encoder_lr >= 0 and math.isfinite(self.encoder_lr)
        ):
            raise InvalidInputError(
                f"encoder_lr must be >= 0 (0 freezes the encoder) or None, got {self.encoder_lr!r}"
            )
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise InvalidInputError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise InvalidInputError(f"log_every must be >= 1, got {self.log_every!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InvalidInputError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InvalidInputError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InvalidInputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (self.latent_adversary >= 0 and math.isfinite(self.latent_adversary)):
            raise InvalidInputError(
                f"latent_adversary must be a finite number >= 0, got {self.latent_adversary!r}"
            )
        if not (self.identity_shift >= 0 and math.isfinite(self.identity_shift)):
            raise InvalidInputError(
                f"identity_shift must be a finite number >= 0, got {self.identity_shift!r}"
            )
        if self.identity_shift > 0 and not self.encoder_frozen:
            raise InvalidInputError("identity_shift needs a frozen encoder (encoder_lr=0)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InvalidInputError(f"grad_clip must be positive or None, got {self.grad_clip!r}")

    @property
    def effective_encoder_lr(self) -> float:
        return self.lr if self.encoder_lr is None else self.encoder_lr

    @property
    def encoder_frozen(self) -> bool:
        return self.effective_encoder_lr == 0


@torch.no_grad()
def mean_latent(encoder: Encoder, images: Tensor, batch: int = 256) -> Tensor:
    """The mean latent (float32 ``latent_shape``) of ``images`` (uint8 (N,R,R,3) or float
    (N,3,R,R) in [0,1], as Trainer takes them) and of their mirror images: training flips
    half its faces, so the mean a latent is compared with should not lean either way."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    total: Tensor | None = None
    try:
        for start in range(0, images.shape[0], batch):
            x = images[start : start + batch].to(device)
            x = images_to_unit(x) if x.dtype == torch.uint8 else x.float()
            z = encoder(torch.cat((x, x.flip(-1)))).float().sum(0)
            total = z if total is None else total + z
    finally:
        encoder.train(was_training)
    if total is None:
        raise InvalidInputError("mean_latent needs at least one image")
    return total / (2 * images.shape[0])


class _AutoEncoders(nn.Module):
    """The trained part of a step's forward pass as one module: the encoder (unless it is
    frozen) and every identity's decoder on its share of the batch. One module, so a wrapper
    such as DistributedDataParallel sees every trained parameter in one forward call. A
    decoder's mask comes back only where ``with_mask`` says the loss has a target for it:
    what is returned is what DistributedDataParallel waits for gradients of."""

    def __init__(
        self, encoder: Encoder | None, decoders: list[Decoder], with_mask: list[bool]
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleList(decoders)
        self.with_mask = with_mask

    def forward(
        self, x: Tensor, batch_size: int
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor | None]]]:
        """(latents, [(rgb, mask or None) per decoder]); ``x`` is already the latent when
        the encoder is frozen (run outside, without gradients)."""
        z = x if self.encoder is None else self.encoder(x)
        out = []
        for dec, zi, keep in zip(self.decoders, z.split(batch_size), self.with_mask, strict=True):
            rgb, mask = dec(zi)
            out.append((rgb, mask if keep else None))
        return z, out


@dataclass
class Progress:
    step: int
    steps: int
    losses: dict[str, float]  # per identity + "total", mean since the previous report
    examples_per_s: float
    eta_s: float
    elapsed_s: float


class Trainer:
    def __init__(
        self,
        encoder: Encoder,
        decoders: Mapping[str, Decoder],
        data: Mapping[str, Tensor],
        config: TrainConfig,
        device: torch.device | str = "cpu",
        masks: Mapping[str, Tensor] | None = None,
        weights: Mapping[str, Tensor] | None = None,
        extra_latent_means: Mapping[str, Tensor] | None = None,
    ) -> None:
        """``data[name]``: uint8 (N,R,R,3) RGB faces of that identity, or float (N,3,R,R)
        in [0,1]; copied to ``device`` once. ``masks[name]`` (optional): (N,R,R), (N,R,R,1)
        or (N,1,R,R), uint8 0..255 / bool / float in [0,1]. ``weights[name]`` (optional):
        per-pixel loss emphasis of each face, float >= 0 in the same shapes (e.g. eyes and
        mouth from ``losses.landmark_weight_map``); augmented with the face.
        ``extra_latent_means``: mean latents (see ``mean_latent``) of people not trained
        here, more places for ``identity_shift`` to move latents to."""
        if not decoders:
            raise InvalidInputError("at least one identity decoder is needed to train")
        if set(data) != set(decoders):
            raise InvalidInputError(
                f"data and decoders must name the same identities: data has "
                f"{sorted(data)}, decoders have {sorted(decoders)}"
            )
        if TOTAL in decoders:
            raise InvalidInputError(f"{TOTAL!r} is reserved and cannot name an identity")
        extra_masks = set(masks or {}) - set(decoders)
        if extra_masks:
            raise InvalidInputError(f"masks given for unknown identities: {sorted(extra_masks)}")
        extra_weights = set(weights or {}) - set(decoders)
        if extra_weights:
            raise InvalidInputError(
                f"weights given for unknown identities: {sorted(extra_weights)}"
            )

        self.config = config
        self.device = torch.device(device)
        self.model_config = encoder.config
        res = self.model_config.resolution
        for name, dec in decoders.items():
            dc = dec.config
            if dc.latent_shape != self.model_config.latent_shape or dc.resolution != res:
                raise InvalidInputError(
                    f"decoder {name!r} ({dc.name}: latent {dc.latent_shape}, {dc.resolution}px) "
                    f"does not fit encoder {self.model_config.name} (latent "
                    f"{self.model_config.latent_shape}, {res}px)"
                )

        self.identities = sorted(decoders)  # fixed order: results do not depend on dict order
        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        # Module.to accepts memory_format at runtime; torch's stubs do not declare it.
        self.encoder = encoder.to(self.device, memory_format=memory_format)  # type: ignore[call-overload]
        self.decoders = {
            n: decoders[n].to(self.device, memory_format=memory_format)  # type: ignore[call-overload]
            for n in self.identities
        }
        self._images = {n: self._prepare_images(n, data[n], res) for n in self.identities}
        self._masks: dict[str, Tensor] = {}
        for n, m in (masks or {}).items():
            self._masks[n] = self._prepare_masks(n, m, res, self._images[n].shape[0])
        self._weights: dict[str, Tensor] = {}
        for n, w in (weights or {}).items():
            wt = torch.as_tensor(w)
            if not wt.is_floating_point() or (wt.numel() and not bool((wt >= 0).all())):
                raise InvalidInputError(f"weights for {n!r} must be float and >= 0")
            self._weights[n] = self._prepare_masks(n, wt, res, self._images[n].shape[0], True)

        self.encoder.train(not config.encoder_frozen)
        for dec in self.decoders.values():
            dec.train()
        groups: list[dict[str, Any]] = []
        if not config.encoder_frozen:
            groups.append(
                {"params": list(self.encoder.parameters()), "lr": config.effective_encoder_lr}
            )
        groups.append(
            {
                "params": [p for n in self.identities for p in self.decoders[n].parameters()],
                "lr": config.lr,
            }
        )
        self._params = [p for g in groups for p in g["params"]]
        # What a step runs its forward passes through; wrap() may put these in wrappers.
        self._autoencoders: nn.Module = _AutoEncoders(
            None if config.encoder_frozen else self.encoder,
            [self.decoders[n] for n in self.identities],
            [n in self._masks for n in self.identities],
        )
        self._base_lrs = [float(g["lr"]) for g in groups]
        self.optimizer = torch.optim.Adam(
            groups, lr=config.lr, betas=config.betas, fused=self.device.type == "cuda"
        )

        self.critic: LatentCritic | None = None
        self.critic_optimizer: torch.optim.Optimizer | None = None
        self._critic_loss: Tensor | None = None
        if config.latent_adversary > 0 and not config.encoder_frozen and len(self.identities) > 1:
            self.critic = build_latent_critic(
                self.model_config, len(self.identities), seed=config.seed + 104_729
            ).to(self.device)
            self.critic_optimizer = torch.optim.Adam(
                self.critic.parameters(),
                lr=CRITIC_LR,
                betas=config.betas,
                fused=self.device.type == "cuda",
            )
        self._critic_fwd: nn.Module | None = self.critic

        # A CPU generator drives sampling and augmentation on any device (augment draws its
        # few random numbers on the generator's device), so a seed means the same batches
        # everywhere and nothing global is seeded.
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(config.seed)
        self._queues: dict[str, Tensor] = {
            n: torch.empty(0, dtype=torch.long) for n in self.identities
        }
        self._use_autocast = config.autocast and self.device.type == "cuda"
        self._shift_bank: Tensor | None = None
        if config.identity_shift > 0:
            self._shift_bank = self._latent_bank(extra_latent_means or {})
        self.steps_done = 0

    def _latent_bank(self, extra: Mapping[str, Tensor]) -> Tensor:
        """(identities + extras, *latent_shape): the trained identities' mean latents, in
        ``self.identities`` order, then the extra ones."""
        means = [mean_latent(self.encoder, self._images[n]) for n in self.identities]
        for name, m in extra.items():
            t = torch.as_tensor(m)
            if tuple(t.shape) != self.model_config.latent_shape or not t.is_floating_point():
                raise InvalidInputError(
                    f"extra latent mean {name!r} must be float {self.model_config.latent_shape}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            means.append(t.to(self.device, torch.float32))
        if len(means) < 2:
            raise InvalidInputError(
                "identity_shift needs another person's mean latent: train >= 2 identities "
                "or pass extra_latent_means"
            )
        return torch.stack(means)

    def wrap(
        self,
        autoencoders: Callable[[nn.Module], nn.Module],
        critic: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        """Run a step's trained forward passes through wrappers of the modules (e.g.
        DistributedDataParallel): ``autoencoders`` gets the trained encoder and decoders as
        one module, ``critic`` the latent critic. ``encoder``, ``decoders`` and ``critic``
        stay the bare modules, so state dicts and checkpoints do not change."""
        self._autoencoders = autoencoders(self._autoencoders)
        if critic is not None and self.critic is not None:
            self._critic_fwd = critic(self.critic)

    @property
    def untrained_in_step(self) -> bool:
        """Whether some trained parameters get no gradient in a step: a decoder's mask head
        when its identity has no masks to learn it from."""
        return any(
            self.decoders[n].config.mask_head and n not in self._masks for n in self.identities
        )

    # ------------------------------------------------------------------ data

    def _prepare_images(self, name: str, x: Tensor | np.ndarray, res: int) -> Tensor:
        t = torch.as_tensor(x)
        if t.dtype == torch.uint8:
            if t.dim() != 4 or tuple(t.shape[1:]) != (res, res, 3):
                raise InvalidInputError(
                    f"faces for {name!r} must be uint8 (N,{res},{res},3) RGB, got {tuple(t.shape)}"
                )
        elif t.is_floating_point():
            if t.dim() != 4 or tuple(t.shape[1:]) != (3, res, res):
                raise InvalidInputError(
                    f"float faces for {name!r} must be (N,3,{res},{res}), got {tuple(t.shape)}"
                )
            if t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
                raise InvalidInputError(f"float faces for {name!r} must be finite, in [0, 1]")
            t = t.float()
        else:
            raise InvalidInputError(f"faces for {name!r} must be uint8 or float, got {t.dtype}")
        if t.shape[0] < 1:
            raise InvalidInputError(f"no faces for identity {name!r}")
        # uint8 stays uint8 on the device: 4x less memory than float for large sets.
        return t.to(self.device).contiguous()

    def _prepare_masks(
        self, name: str, m: Tensor | np.ndarray, res: int, n: int, weights: bool = False
    ) -> Tensor:
        t = torch.as_tensor(m)
        if t.dim() == 4 and t.shape[-1] == 1 and t.shape[1] != 1:
            t = t.permute(0, 3, 1, 2)
        elif t.dim() == 3:
            t = t.unsqueeze(1)
        if t.dim() != 4 or tuple(t.shape[1:]) != (1, res, res) or t.shape[0] != n:
            raise InvalidInputError(
                f"masks for {name!r} must be ({n},{res},{res}) or ({n},1,{res},{res}), got "
                f"{tuple(torch.as_tensor(m).shape)}"
            )
        if t.dtype == torch.bool:
            t = t.to(torch.uint8) * 255
        elif t.is_floating_point():
            if t.numel() and (t.min() < 0 or (t.max() > 1 and not weights)):
                raise InvalidInputError(f"float masks for {name!r} must be in [0, 1]")
            t = t.float()
        elif t.dtype != torch.uint8:
            raise InvalidInputError(f"masks for {name!r} must be uint8, bool or float")
        return t.to(self.device).contiguous()

    def _next_indices(self, name: str) -> Tensor:
        # Epoch-style: walk shuffled permutations so every face is seen once per epoch.
        bs = self.config.batch_size
        n = self._images[name].shape[0]
        queue = self._queues[name]
        while queue.numel() < bs:
            queue = torch.cat((queue, torch.randperm(n, generator=self._gen)))
        self._queues[name] = queue[bs:]
        return queue[:bs]

    def _batch(self, name: str, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        idx = idx.to(self.device)
        imgs = self._images[name].index_select(0, idx)
        if imgs.dtype == torch.uint8:
            # NCHW on the CPU (images_to_unit); on a GPU the permuted view's channels-last
            # strides, as the GPU training rows of bench/RESULTS.md were measured with.
            if imgs.device.type == "cpu":
                imgs = images_to_unit(imgs)
            else:
                imgs = to_unit(imgs.permute(0, 3, 1, 2))
        mask = self._masks.get(name)
        if mask is None:
            return imgs, None
        m = mask.index_select(0, idx)
        return imgs, (to_unit(m) if m.dtype == torch.uint8 else m)

    def _weights_of(self, name: str, idx: Tensor) -> Tensor | None:
        w = self._weights.get(name)
        return None if w is None else w.index_select(0, idx.to(self.device))

    # ------------------------------------------------------------------ training

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._use_autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self) -> Tensor:
        """One optimisation step; returns detached [loss per identity..., total] without
        a host sync, so ``fit`` can read losses only when it reports."""
        cfg = self.config
        pairs = []
        emphasis: list[Tensor | None] = []
        for name in self.identities:
            idx = self._next_indices(name)
            imgs, masks = self._batch(name, idx)
            weights = self._weights_of(name, idx)
            if weights is None:
                pairs.append(make_training_pair(imgs, self._gen, cfg.augment, cfg.warp, masks))
                emphasis.append(None)
                continue
            # The weights ride along as one more mask channel: the same rotation, zoom,
            # shift and flip as the target they weigh.
            both = weights if masks is None else torch.cat((masks, weights), dim=1)
            pair = make_training_pair(imgs, self._gen, cfg.augment, cfg.warp, both)
            assert pair.masks is not None
            emphasis.append(pair.masks[:, -1:])
            pair.masks = pair.masks[:, :1] if masks is not None else None
            pairs.append(pair)
        inputs = torch.cat([p.inputs for p in pairs])
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)

        with self._autocast():
            if cfg.encoder_frozen:
                with torch.no_grad():
                    inputs = self.encoder(inputs)
                    if self._shift_bank is not None:
                        inputs = inputs + self._identity_shift(inputs)
            z, outputs = self._autoencoders(inputs, cfg.batch_size)

        # Loss outside autocast: SSIM's convolutions and the sums need float32.
        per_identity = []
        for pair, (rgb, pred_mask), weights in zip(pairs, outputs, emphasis, strict=True):
            terms = loss_terms(
                rgb,
                pair.targets,
                mask=pair.masks if cfg.masked_loss else None,
                pred_mask=pred_mask,
                target_mask=pair.masks,
                weights=weights,
                terms=cfg.loss,
            )
            per_identity.append(terms["total"])
        total = torch.stack(per_identity).sum()
        objective = total
        if self.critic is not None:
            # The encoder's side of the game: the critic is a fixed judge here, only z moves.
            self.critic.requires_grad_(False)
            try:
                confusion = identity_confusion(self.critic(z.float()))
            finally:
                self.critic.requires_grad_(True)
            objective = total + cfg.latent_adversary * confusion

        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.critic is not None:
            # Before the main update, so a failure in it (out of memory: the job retries the
            # step at a smaller batch) cannot leave the step half applied.
            self._critic_step(z.detach())
        self._apply_schedule()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
        self.optimizer.step()
        self.steps_done += 1
        return torch.cat((torch.stack(per_identity), total.view(1))).detach()

    def _identity_shift(self, z: Tensor) -> Tensor:
        """Per latent: u * (another person's mean - its own person's), see TrainConfig."""
        assert self._shift_bank is not None
        bank, bs = self._shift_bank, self.config.batch_size
        k = len(self.identities)
        own = torch.arange(k).repeat_interleave(bs)
        # Another index than its own: an offset in [1, len(bank)) added modulo len(bank).
        offset = torch.randint(1, bank.shape[0], (k * bs,), generator=self._gen)
        other = (own + offset) % bank.shape[0]
        u = torch.rand(k * bs, generator=self._gen) * self.config.identity_shift
        delta = bank[other.to(bank.device)] - bank[own.to(bank.device)]
        return (u.to(z.device).view(-1, 1, 1, 1) * delta).to(z.dtype)

    def _critic_step(self, z: Tensor) -> None:
        """The critic's side: learn which identity each latent of this step came from."""
        assert self.critic is not None and self.critic_optimizer is not None
        labels = torch.arange(len(self.identities), device=z.device)
        labels = labels.repeat_interleave(z.shape[0] // len(self.identities))
        assert self._critic_fwd is not None
        loss = F.cross_entropy(self._critic_fwd(z.float()), labels)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        self._critic_loss = loss.detach()

    def _apply_schedule(self) -> None:
        cfg = self.config
        factor = 1.0
        if cfg.lr_schedule == "cosine" and cfg.steps > 0:
            progress = min(self.steps_done / cfg.steps, 1.0)
            factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        if self.steps_done < cfg.warmup_steps:
            factor *= (self.steps_done + 1) / (cfg.warmup_steps + 1)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor

    def _as_dict(self, values: list[float]) -> dict[str, float]:
        out = dict(zip(self.identities, values[:-1], strict=True))
        out[TOTAL] = values[-1]
        if not all(math.isfinite(v) for v in values):
            raise PreconditionError(
                f"training diverged at step {self.steps_done}: losses {out}; lower the "
                "learning rate or set grad_clip"
            )
        return out

    def step(self) -> dict[str, float]:
        """One optimisation step over a batch of every identity; returns its losses."""
        return self._as_dict(self._train_step().tolist())

    def fit(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Train until ``config.steps`` steps are done (counting earlier ``step``/``fit``
        calls) or ``should_stop()`` returns True; ``on_progress`` is called every
        ``log_every`` steps and at the end. Returns a JSON-safe summary."""
        cfg = self.config
        start = time.perf_counter()
        start_step = self.steps_done
        per_step = cfg.batch_size * len(self.identities)
        acc: Tensor | None = None
        acc_n = 0
        last: dict[str, float] = {}
        stopped = False

        def report() -> None:
            nonlocal acc, acc_n, last
            if acc is None:
                return
            last = self._as_dict((acc / acc_n).tolist())  # the only host sync in the loop
            acc, acc_n = None, 0
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                rate = (self.steps_done - start_step) / elapsed if elapsed > 0 else 0.0
                remaining = max(cfg.steps - self.steps_done, 0)
                on_progress(
                    Progress(
                        step=self.steps_done,
                        steps=cfg.steps,
                        losses=dict(last),
                        examples_per_s=rate * per_step,
                        eta_s=remaining / rate if rate > 0 else math.inf,
                        elapsed_s=elapsed,
                    )
                )

        while self.steps_done < cfg.steps:
            if should_stop is not None and should_stop():
                stopped = True
                break
            losses = self._train_step()
            acc = losses if acc is None else acc + losses
            acc_n += 1
            if self.steps_done % cfg.log_every == 0:
                report()
        report()

        elapsed = time.perf_counter() - start
        done = self.steps_done - start_step
        return {
            "steps": self.steps_done,
            "steps_requested": cfg.steps,
            "steps_this_run": done,
            "stopped": stopped,
            "final_losses": last,
            "wall_s": elapsed,
            "steps_per_s": done / elapsed if elapsed > 0 else 0.0,
            "examples_per_s": done * per_step / elapsed if elapsed > 0 else 0.0,
            "batch_size": cfg.batch_size,
            "identities": list(self.identities),
            "encoder_frozen": cfg.encoder_frozen,
            "lr": cfg.lr,
            "encoder_lr": cfg.effective_encoder_lr,
            "seed": cfg.seed,
            "warp": cfg.warp,
            "latent_adversary": cfg.latent_adversary if self.critic is not None else 0.0,
            # ln(identities) is a critic that cannot tell them apart; 0, one that always can.
            "critic_loss": (float(self._critic_loss) if self._critic_loss is not None else None),
            "lr_schedule": cfg.lr_schedule,
            "model": self.model_config.name,
            "device": str(self.device),
        }
