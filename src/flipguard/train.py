"""Training loop for reconstruction models (Adam, L2/SSIM/MS-GMS losses, light seeded augmentation,
optional cosine learning-rate decay and an exponential moving average of the weights).

Shuffling and augmentation draw from one ``torch.Generator`` seeded with ``cfg.seed`` (the
global RNG is never touched), so the same model initialisation, data and config give
identical weights on the same device and thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flipguard.errors import FlipguardError
from flipguard.models.cae import StrictConfig
from flipguard.models.defects import corrupt_batch
from flipguard.ssim import msgms_map, ssim

__all__ = [
    "TrainConfig",
    "TrainError",
    "train_model",
    "augment_batch",
    "random_crops",
    "resolve_device",
]


class TrainError(FlipguardError, RuntimeError):
    """Training cannot proceed (bad data, diverging loss); one line."""


class TrainConfig(StrictConfig):
    """Hyper-parameters of :func:`train_model`.

    Example:
        >>> TrainConfig(epochs=5, loss="l2+ssim").lr
        0.0002
    """

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    loss: Literal["l2", "ssim", "l2+ssim", "l2+ssim+msgms"] = "ssim"
    weight_decay: float = Field(1e-5, ge=0)
    augment: bool = Field(False, description="random flips + brightness jitter (+ rot90)")
    rot90: bool = Field(False, description="with augment: random 90-degree rotations")
    brightness: float = Field(0.05, ge=0, le=0.5, description="max additive brightness jitter")
    inpaint: float = Field(
        0.0, ge=0, le=1,
        description="fraction of training images given a synthetic defect the model must "
        "repair (inpainting objective; 0 = plain reconstruction)",
    )
    crop: int = Field(
        0, ge=0, description="patch-based training: random crop side in pixels per image and "
        "step (a multiple of 16; 0 = whole images). Inference stays on whole images.",
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate: constant, or cosine decay to 0 over all steps"
    )
    ema: float = Field(
        0.0, ge=0, lt=1, description="decay of an exponential moving average of the weights "
        "that replaces them at the end (0 = off; e.g. 0.999)",
    )
    seed: int = Field(0, ge=0)
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:1', ... or 'auto'")

    @field_validator("crop")
    @classmethod
    def _crop16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("expected 0 or a multiple of 16")
        return v


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; bad or unavailable names raise TrainError.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise TrainError(f"TrainConfig.device: expected 'cpu', 'cuda[:i]' or 'auto' "
                         f"(got {device!r})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"TrainConfig.device: {device!r} requested but CUDA is not available")
    return dev


def augment_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    brightness: float = 0.05,
    rot90: bool = False,
) -> torch.Tensor:
    """Light augmentation of a CPU batch (N, C, H, W) in [0, 1], drawn from ``gen``:
    horizontal and vertical flips (p = 0.5 each), additive brightness jitter
    ``U(-brightness, brightness)`` per image (clamped to [0, 1]) and, if ``rot90`` and the
    images are square, a random multiple of 90 degrees.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_batch(torch.rand(4, 1, 8, 8), g).shape
        torch.Size([4, 1, 8, 8])
    """
    n = x.shape[0]
    hflip = torch.rand(n, generator=gen) < 0.5
    vflip = torch.rand(n, generator=gen) < 0.5
    shift = (torch.rand(n, generator=gen) * 2.0 - 1.0) * brightness
    rots = torch.randint(0, 4, (n,), generator=gen)
    x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    if rot90 and x.shape[-1] == x.shape[-2]:
        out = x
        for k in (1, 2, 3):
            out = torch.where((rots == k).view(-1, 1, 1, 1), torch.rot90(x, k, dims=(-2, -1)), out)
        x = out
    return (x + shift.to(x.dtype).view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image of ``x`` (N, C, H, W), drawn from ``gen``.

    Example:
        >>> random_crops(torch.rand(3, 1, 32, 24), 16, torch.Generator().manual_seed(0)).shape
        torch.Size([3, 1, 16, 16])
    """
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise TrainError(f"TrainConfig.crop: {size} exceeds the image size {h}x{w}")
    tops = torch.randint(0, h - size + 1, (x.shape[0],), generator=gen).tolist()
    lefts = torch.randint(0, w - size + 1, (x.shape[0],), generator=gen).tolist()
    return torch.stack([img[:, t : t + size, le : le + size]
                        for img, t, le in zip(x, tops, lefts, strict=True)])


def _loss(kind: str, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    if kind == "l2":
        return F.mse_loss(r, x)
    if kind == "ssim":
        return 1.0 - ssim(x, r)
    total = F.mse_loss(r, x) + (1.0 - ssim(x, r))
    if kind == "l2+ssim+msgms":  # RIAD (Zavrtanik et al. 2021): + the multi-scale GMS loss
        total = total + (1.0 - msgms_map(x, r)).mean()
    return total


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    cfg: TrainConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` to reconstruct ``images`` (N, C, H, W) in [0, 1] with Adam.

    Returns the mean training loss of each epoch (weighted by batch size) and calls
    ``progress(epoch, loss)`` after each epoch (epochs count from 1). The model is moved to
    ``cfg.device`` and left there, in eval mode. Raises :class:`TrainError` on empty data or a
    non-finite loss.

    Example:
        >>> from flipguard.models import CAEConfig, build_cae
        >>> model = build_cae(CAEConfig(input_size=16, width=0.25, latent_dim=4))
        >>> losses = train_model(model, torch.rand(8, 1, 16, 16), TrainConfig(epochs=2))
        >>> len(losses)
        2
    """
    cfg = cfg or TrainConfig()
    if images.dim() != 4 or images.shape[0] == 0:
        raise TrainError(f"training images: expected a non-empty (N, C, H, W) tensor "
                         f"(got shape {tuple(images.shape)})")
    if not torch.isfinite(images).all():
        raise TrainError("training images: expected finite values (found NaN/Inf)")
    if cfg.crop and (cfg.crop % 16 or cfg.crop > min(images.shape[-2:])):
        raise TrainError(f"TrainConfig.crop: expected a multiple of 16 no larger than the "
                         f"images {tuple(images.shape[-2:])} (got {cfg.crop})")
    dev = resolve_device(cfg.device)
    model.to(dev)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = images.detach().float().cpu()
    n = data.shape[0]
    steps = cfg.epochs * -(-n // cfg.batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
             if cfg.schedule == "cosine" else None)
    avg = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    history: list[float] = []
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            batch = data[perm[i : i + cfg.batch_size]]
            if cfg.crop:
                batch = random_crops(batch, cfg.crop, gen)
            if cfg.augment:
                batch = augment_batch(batch, gen, cfg.brightness, cfg.rot90)
            inputs = corrupt_batch(batch, gen, cfg.inpaint)[0] if cfg.inpaint > 0 else batch
            batch, inputs = batch.to(dev), inputs.to(dev)
            opt.zero_grad(set_to_none=True)
            loss = _loss(cfg.loss, batch, model(inputs))
            if not torch.isfinite(loss):
                model.eval()
                raise TrainError(f"training loss became non-finite at epoch {epoch} "
                                 f"(TrainConfig.lr={cfg.lr} too high?)")
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if avg is not None:
                avg.update_parameters(model)
            total += float(loss.detach()) * batch.shape[0]
        history.append(total / n)
        if progress is not None:
            progress(epoch, history[-1])
    if avg is not None:
        model.load_state_dict(avg.module.state_dict())
    model.eval()
    return history
