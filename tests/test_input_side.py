"""Input-side score terms computed once: the scorer and the engine give bit-identical scores
and outcomes with and without them, for every map, and a faulty run never recomputes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.detect import ScoreConfig, Scorer, fit_map_stats
from flipguard.errors import ConfigError
from flipguard.faults import Fault
from flipguard.inject import DetectionTask, Engine
from flipguard.models.cae import CAEConfig, build_cae

CONFIGS = [ScoreConfig(map="l2", smooth_sigma=0.0), ScoreConfig(map="ssim", reduce="mean"),
           ScoreConfig(map="ssim", smooth_sigma=1.0, ssim_window=7, ssim_sigma=1.0),
           ScoreConfig(map="msgms", smooth_sigma=2.0, batch_size=5),
           ScoreConfig(map="msgms", smooth_sigma=0.0, standardize=True)]


def _scorer(cfg: ScoreConfig, size: int = 24) -> Scorer:
    if cfg.standardize:
        g = torch.Generator().manual_seed(3)
        cfg = fit_map_stats(cfg.model_copy(update={"standardize": False}), nn.Identity(),
                            torch.rand(6, 1, size, size, generator=g), 8)
    return Scorer(cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.map}-{c.smooth_sigma}-{c.batch_size}")
def test_scores_with_the_input_side_are_bit_identical(cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(13, 2, 24, 24, generator=g)
    r = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = _scorer(cfg)
    side = s.input_side(x)
    assert len(side) == (0 if cfg.map == "l2" else 13)
    assert s.scores(x, r, side=side).equal(s.scores(x, r))
    rows = np.array([12, 3, 3, 0, 7])  # any order, repeats: as the engine's padded chunks
    assert s.scores(x[rows], r[rows], side=side.take(rows)).equal(s.scores(x[rows], r[rows]))
    assert not s.scores(x[rows], r[rows], side=side.take(rows[::-1].copy())).equal(
        s.scores(x[rows], r[rows])) or cfg.map == "l2"  # the side really is used


def test_a_side_of_other_images_is_refused():
    s = Scorer(ScoreConfig(map="msgms"))
    x = torch.rand(4, 1, 16, 16)
    with pytest.raises(ConfigError, match="input side of 3 images"):
        s.scores(x[:3], x[:3], side=s.input_side(x))


class _Counting:
    """A scorer's score and input-side functions that count their calls."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer, self.sides, self.with_side, self.without = scorer, 0, 0, 0

    def input_side(self, x):
        self.sides += 1
        return self.scorer.input_side(x)

    def scores(self, x, r, side=None):
        if side is None:
            self.without += 1
        else:
            self.with_side += 1
        return self.scorer.scores(x, r, side=side)


@pytest.mark.parametrize("map_", ["msgms", "ssim"])
def test_engine_outcomes_are_identical_and_the_side_is_computed_once(map_):
    torch.manual_seed(0)
    net = build_cae(CAEConfig(input_size=16, channels=1, width=0.125, latent_dim=4)).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(21, 1, 16, 16, generator=g)
    scorer = Scorer(ScoreConfig(map=map_, smooth_sigma=1.0))
    with torch.no_grad():
        s0 = scorer.scores(x, net(x))
    thr = float(s0.median())
    labels = (s0 > thr).long().numpy()
    faults = [Fault("weight", name[: -len(".weight")], i, (b,))
              for name, p in net.named_parameters() if name.endswith(".weight")
              for i in (0, p.numel() // 2, p.numel() - 1) for b in (30, 22, 3)]
    faults.append(Fault("activation", "encoder.0", 5, (29,)))
    counting = _Counting(scorer)
    plain = Engine(net, x, DetectionTask(scorer.scores, thr, labels), batch_size=8)
    cached = Engine(net, x, DetectionTask(counting.scores, thr, labels,
                                          input_side=counting.input_side), batch_size=8)
    a, b = plain.run(faults), cached.run(faults)
    assert [o.to_dict() for o in a] == [o.to_dict() for o in b]
    assert np.array_equal(plain.golden.facts, cached.golden.facts)
    assert counting.sides == 1 and counting.without == 0 and counting.with_side > 3
    assert sum(o.flips_to_anomalous + o.flips_to_normal for o in b) > 0  # faults that matter


def test_input_side_must_be_callable():
    with pytest.raises(ConfigError, match="input_side: expected a callable"):
        DetectionTask(lambda x, y: x.sum((1, 2, 3)), 0.5, [0], input_side=3)
