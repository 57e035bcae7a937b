"""A classifier search space, the example of a user space: small CNNs for scikit-learn's
8x8 digits (the digits CNN of ``benchmarks/bench_ra_classifier.py`` is its baseline).

An architecture is ``conv(1 -> c1, k) - act - conv(c1 -> c2, k) - act - [fc(-> hidden) -
act] - fc(-> 10)``. Use it as ``flipguard nas --space digits --data digits.pt`` with the
file written by :func:`write_digits_data`; a space of your own is the same: a
:class:`~flipguard.nas.space.SearchSpace` with ``task = "classification"``, reachable as
``--space pkg.module:name``.

>>> space = DigitsSpace()
>>> net = space.build({"c1": 8, "c2": 16, "kernel": 3, "hidden": 0, "act": "relu6"}, (1, 8, 8))
>>> net(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
>>> space.size()
180
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flipguard.fileio import save_torch
from flipguard.nas.activations import LearnedClip, make_activation
from flipguard.nas.space import Param, SearchSpace

__all__ = ["DigitsSpace", "write_digits_data"]


def _act(name: str, channels: int, ndim: int) -> nn.Module:
    if name == "learned":
        return LearnedClip(channels, ndim=ndim)
    return make_activation(name, channels)


class DigitsSpace(SearchSpace):
    """Small CNN classifiers of 8x8 digits."""

    name = "digits"
    task = "classification"
    params = (Param("c1", (4, 8, 16)), Param("c2", (8, 16, 32)), Param("kernel", (2, 3)),
              Param("hidden", (0, 32)),
              Param("act", ("leaky", "relu6", "ranger", "clipact", "learned")))

    def build(self, arch: dict[str, Any], input_shape: Sequence[int],
              seed: int = 0) -> nn.Module:
        a = self.validate(arch)
        c, h = int(input_shape[0]), int(input_shape[-1])
        k = a["kernel"]
        side = h - 2 * (k - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            layers: list[nn.Module] = [nn.Conv2d(c, a["c1"], k), _act(a["act"], a["c1"], 4),
                                       nn.Conv2d(a["c1"], a["c2"], k),
                                       _act(a["act"], a["c2"], 4), nn.Flatten()]
            feats = a["c2"] * side * side
            if a["hidden"]:
                layers += [nn.Linear(feats, a["hidden"]), _act(a["act"], a["hidden"], 2)]
                feats = a["hidden"]
            layers.append(nn.Linear(feats, 10))
            return nn.Sequential(*layers)

    def baseline(self, input_shape: Sequence[int], seed: int = 0) -> nn.Module:
        """The digits CNN of the RA benchmark (conv 1->8, conv 8->16, fc 256->10, ReLU)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(256, 10))

    def baseline_name(self) -> str:
        return "digits CNN"


def write_digits_data(path: str | Path, seed: int = 0, n_test: int = 500) -> Path:
    """Write scikit-learn's digits (shipped with the package, no download) as a ``.pt``
    file: ``inputs``/``labels`` (training) and ``test_inputs``/``test_labels`` (the last
    ``n_test`` of a seeded permutation)."""
    from sklearn.datasets import load_digits


    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))
    tr, te = perm[:-n_test], perm[-n_test:]
    path = Path(path)
    save_torch({"inputs": x[tr].contiguous(), "labels": y[tr].contiguous(),
                "test_inputs": x[te].contiguous(), "test_labels": y[te].contiguous()}, path)
    return path
