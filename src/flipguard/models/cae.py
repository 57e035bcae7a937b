"""Convolutional autoencoder of the SSIM-AE family (Bergmann et al., VISAPP 2019).

For a 128x128 input the encoder is::

    Conv 32 4x4/2 -> 32 4x4/2 -> 32 3x3/1 -> 64 4x4/2 -> 64 3x3/1 -> 128 4x4/2
    -> 64 3x3/1 -> 32 3x3/1 -> latent d 8x8 valid (linear)

(padding 1 for the 4x4/2 and 3x3/1 convolutions) and the decoder mirrors it with
``ConvTranspose2d`` layers, ending in a sigmoid. LeakyReLU(0.2) follows every other layer.
The default ``CAEConfig()`` (128 px, 1 channel, width 1, latent 100) has 1,048,549
parameters (``count_parameters(build_cae(CAEConfig()))``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from flipguard.errors import ConfigError
from flipguard.models.memory import Memory

__all__ = ["CAE", "CAEConfig", "build_cae", "count_parameters"]


def _one_line(model: str, exc: ValidationError) -> str:
    """First pydantic error as ``Model.field: message (got value)``."""
    err = exc.errors()[0]
    inner = err.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError):  # raised by a nested StrictConfig.__init__
        return str(inner)
    loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    extra = f" (got {err['input']!r})" if "input" in err and err.get("type") != "missing" else ""
    if len(extra) > 80:
        extra = ""
    return f"{model}.{loc}: {msg}{extra}"


class StrictConfig(BaseModel):
    """Pydantic base for flipguard configs: unknown fields are rejected and invalid values
    raise :class:`~flipguard.errors.ConfigError` with one line naming the field.

    Nested inside another pydantic model, the outer model reports the usual
    ``ValidationError`` instead.
    """

    model_config: ClassVar[ConfigDict] = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_one_line(type(self).__name__, exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(_one_line(type(self).__name__, exc)) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_one_line(cls.__name__, exc)) from None


class CAEConfig(StrictConfig):
    """Architecture of :func:`build_cae`.

    Example:
        >>> cfg = CAEConfig(input_size=32, channels=3, width=0.25, latent_dim=16)
        >>> build_cae(cfg)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    input_size: int = Field(128, description="image side in pixels; a multiple of 16")
    channels: int = Field(1, ge=1, description="image channels (1 = grey, 3 = RGB)")
    width: float = Field(1.0, gt=0, description="multiplier of the 32/64/128 channel counts")
    latent_dim: int = Field(100, ge=1, description="bottleneck size: vector length, or channels "
                            "of the (input/16)^2 map when bottleneck='spatial'")
    bottleneck: Literal["vector", "spatial"] = Field(
        "vector", description="'vector': 1x1 latent (Bergmann); 'spatial': fully convolutional"
    )
    latent_stride: Literal[8, 16] = Field(
        16, description="spatial bottleneck only: latent map side = input side / latent_stride "
        "(8: the last 4x4/2 layer becomes 3x3/1)",
    )
    memory: int = Field(0, ge=0, description="spatial bottleneck only: MemAE memory items "
                        "between encoder and decoder (0 = none)")
    seed: int = Field(0, ge=0, description="seed of the weight initialisation")

    @field_validator("input_size")
    @classmethod
    def _check_size(cls, v: int) -> int:
        if v < 16 or v % 16:
            raise ValueError("expected a positive multiple of 16")
        return v


class CAE(nn.Module):
    """Autoencoder ``forward(x) = decoder(encoder(x))``; both halves are ``nn.Sequential``
    so layer names are ``encoder.0``, ``encoder.2``, ... (odd indices are activations)."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential, config: CAEConfig,
                 memory: Memory | None = None):
        super().__init__()
        self.encoder = encoder
        self.memory = memory
        self.decoder = decoder
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if self.memory is not None:
            z = self.memory(z)
        return self.decoder(z)


# (channels at width 1, kernel, stride); padding is 1 for all of these layers.
_BODY: tuple[tuple[int, int, int], ...] = (
    (32, 4, 2),
    (32, 4, 2),
    (32, 3, 1),
    (64, 4, 2),
    (64, 3, 1),
    (128, 4, 2),
    (64, 3, 1),
    (32, 3, 1),
)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def build_cae(cfg: CAEConfig | None = None) -> CAE:
    """Build the SSIM-AE family autoencoder described by ``cfg`` (default: 128 px grey).

    Weights get a He-normal init (see ``_init_weights``) drawn from ``cfg.seed`` without
    touching the global RNG state, so the same config always gives identical weights.

    Example:
        >>> model = build_cae(CAEConfig(input_size=64, width=0.5, latent_dim=32))
        >>> model(torch.rand(1, 1, 64, 64)).shape
        torch.Size([1, 1, 64, 64])
    """
    cfg = cfg or CAEConfig()
    spatial = cfg.bottleneck == "spatial"
    if cfg.latent_stride == 8 and not spatial:
        raise ConfigError("CAEConfig.latent_stride: 8 needs bottleneck='spatial'")
    if cfg.memory and not spatial:
        raise ConfigError("CAEConfig.memory: a memory module needs bottleneck='spatial'")
    body = list(_BODY)
    if cfg.latent_stride == 8:
        body[5] = (body[5][0], 3, 1)
    chans = [max(1, round(c * cfg.width)) for c, _, _ in body]
    latent_k = 3 if spatial else cfg.input_size // 16
    latent_pad = 1 if spatial else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        enc: list[nn.Module] = []
        c_in = cfg.channels
        for c_out, (_, k, s) in zip(chans, body, strict=True):
            enc += [nn.Conv2d(c_in, c_out, k, stride=s, padding=1), _act()]
            c_in = c_out
        # linear latent layer: a vector (k = side/16, valid) or a map (3x3, same)
        enc.append(nn.Conv2d(c_in, cfg.latent_dim, latent_k, padding=latent_pad))
        dec: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.latent_dim, c_in, latent_k, padding=latent_pad),
            _act(),
        ]
        # Mirror: decoder layer i inverts encoder layer j (from the 2nd-to-last back to 0).
        for j in range(len(body) - 1, -1, -1):
            _, k, s = body[j]
            last = j == 0
            c_out = cfg.channels if last else chans[j - 1]
            dec.append(nn.ConvTranspose2d(chans[j], c_out, k, stride=s, padding=1))
            dec.append(nn.Sigmoid() if last else _act())
        mem = Memory(cfg.memory, cfg.latent_dim) if cfg.memory else None
        model = CAE(nn.Sequential(*enc), nn.Sequential(*dec), cfg, mem)
        _init_weights(model)
    return model


def _init_weights(model: CAE) -> None:
    """He-normal init for LeakyReLU(0.2), zero biases (uses the current global RNG).

    The fan is the number of inputs that reach one output element: ``in * k * k`` for a
    convolution, ``in * k * k / stride**2`` for a transposed convolution, and ``in`` for the
    first decoder layer (its input is 1x1). PyTorch's default init shrinks the signal by
    ~100x through this 18-layer net, which stalls training at "predict the mean image".
    """
    gain = math.sqrt(2.0 / (1.0 + 0.2**2))
    first_dec = model.decoder[0]
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        kh, kw = m.kernel_size
        fan = m.in_channels * kh * kw
        if isinstance(m, nn.ConvTranspose2d):
            if m is first_dec and m.padding == (0, 0):
                fan = m.in_channels  # its input is 1x1
            else:
                fan = fan / (m.stride[0] * m.stride[1])
        with torch.no_grad():
            m.weight.normal_(0.0, gain / math.sqrt(fan))
            if m.bias is not None:
                m.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())
