"""Memory module of MemAE (Gong et al., ICCV 2019) for a spatial latent.

Every latent vector (one per position of the (N, C, H, W) map) is replaced by a convex
combination of ``K`` learned memory items: attention ``softmax(z · Mᵀ)`` over the items, hard
shrinkage of weights below ``shrink`` (then renormalised), output ``w · M``. A decoder fed only
combinations of normal prototypes reconstructs anomalies poorly, which is the point.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Memory"]


class Memory(nn.Module):
    """``K`` memory items of dimension ``dim`` (the rows of ``weight``, so they are fault sites
    like any layer's weights); ``shrink`` defaults to ``1 / K``.

    Example:
        >>> mem = Memory(items=4, dim=3)
        >>> mem(torch.rand(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """

    def __init__(self, items: int, dim: int, shrink: float | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(items, dim).uniform_(-bound, bound))
        self.shrink = 1.0 / items if shrink is None else float(shrink)

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """Addressing weights (N·H·W, K) of the latent map ``z`` (rows sum to 1)."""
        q = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).contiguous()  # one layout always
        # Elementwise products and per-row sums, not a matmul: a BLAS gemm may round a row
        # differently by its position in the batch, which would break bit-exact injection.
        att = torch.softmax((q[:, None, :] * self.weight[None]).sum(dim=2), dim=1)
        if self.shrink > 0:
            cut = att - self.shrink
            att = F.relu(cut) * att / (cut.abs() + 1e-12)
            att = att / att.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return att

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, c, h, w = z.shape
        out = (self.attention(z)[:, :, None] * self.weight[None]).sum(dim=1)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
