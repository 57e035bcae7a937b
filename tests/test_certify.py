"""Certified outcomes: sound score intervals, certified faults never change a decision when
simulated (several models, tasks and number formats; thousands of faults), a broken bound is
caught, and campaigns with --certify classify every fault as without."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flipguard.cli import app
from flipguard.detect import ScoreConfig, Scorer, fit_map_stats
from flipguard.errors import ConfigError
from flipguard.faults import Fault, get_format
from flipguard.inject import ClassificationTask, DetectionTask, Engine, Golden, Outcome, classify
from flipguard.inject.certify import Certifier
from flipguard.inject.tasks import ToleranceTask
from flipguard.models.cae import CAEConfig, build_cae

SCORES = [ScoreConfig(map="l2", smooth_sigma=0.0), ScoreConfig(map="ssim", reduce="mean"),
          ScoreConfig(map="msgms", smooth_sigma=2.0), ScoreConfig(map="ssim", smooth_sigma=1.0),
          ScoreConfig(map="msgms", smooth_sigma=1.0, ignore_margin=True)]


@pytest.mark.parametrize(
    "cfg", SCORES, ids=lambda c: f"{c.map}-{c.reduce}-{c.smooth_sigma}-{c.ignore_margin}")
def test_score_interval_holds_every_perturbed_score(cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 24, 24, generator=g)
    if cfg.ignore_margin:  # edge-padded margins of 4 and 5 columns
        x = torch.nn.functional.pad(x[..., 4:19], (4, 5, 0, 0), mode="replicate")
    r = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if cfg.map == "msgms":
        cfg = fit_map_stats(cfg, nn.Identity(), torch.rand(6, 1, 24, 24, generator=g), 8)
    s = Scorer(cfg)
    s0 = s.scores(x, r).double()
    a, b = s.score_interval(x, r, r)
    assert torch.allclose(a, s0, atol=1e-4) and torch.allclose(b, s0, atol=1e-4)
    for e in (1e-4, 1e-2):
        lo, hi = s.score_interval(x, r - e, r + e)
        assert ((hi - lo) > 0).all() and torch.isfinite(hi - lo).all()
        for k in range(30):
            d = (torch.rand(r.shape, generator=g) * 2 - 1) * e
            if k % 3 == 0:
                d = d.sign() * e  # corners of the box
            v = s.scores(x, r + d).double()
            assert (v >= lo - 1e-5).all() and (v <= hi + 1e-5).all()
    lo2, hi2 = s.score_interval(x, r - 1e-3, r + 1e-3)
    assert ((hi2 - lo2) < (hi - lo)).all()  # nested: a smaller box gives a tighter interval


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.LeakyReLU(0.1), nn.Flatten(),
                        nn.Linear(32, 5)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.1, 0.1)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 16),
                         nn.Sigmoid(), nn.Linear(16, 4)).eval()


def _cae() -> nn.Module:
    return build_cae(CAEConfig(input_size=16, channels=1, width=0.125, latent_dim=4)).eval()


def _case(name: str):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(48, 1, 8, 8, generator=g)
    if name in ("cnn", "mlp"):
        net = _cnn() if name == "cnn" else _mlp()
        return net, x, ClassificationTask(net(x).argmax(1))
    if name == "tolerance":
        net = _cnn()
        return net, x, ToleranceTask(48, atol=1e-3, rtol=1e-2)
    net = _cae()
    contrast = torch.linspace(0.05, 1.0, 40).reshape(-1, 1, 1, 1)  # spread-out scores
    x = 0.5 + contrast * (torch.rand(40, 1, 16, 16, generator=g) - 0.5)
    cfg = ScoreConfig(map="ssim" if name == "cae-ssim" else "msgms", smooth_sigma=1.0,
                      ignore_margin=name == "cae-margin")
    if name == "cae-margin":  # tiles 16 x 10 placed as resize="fit" does: edge-padded margins
        x = torch.nn.functional.pad(x[..., 3:13], (3, 3, 0, 0), mode="replicate")
    scorer = Scorer(cfg)
    with torch.no_grad():
        s = scorer.scores(x, net(x))
    v = s.sort().values[len(s) // 4 : 3 * len(s) // 4 + 1]
    i = int((v[1:] - v[:-1]).argmax())
    thr = float(v[i : i + 2].mean())  # in the widest gap of the middle half of the scores
    return net, x, DetectionTask(scorer.scores, thr, (s > thr).long().numpy(),
                                 score_interval=scorer.score_interval)


def _faults(net: nn.Module, fmt: str, n: int, seed: int = 0) -> list[Fault]:
    rng = random.Random(seed)
    layers = [k for k, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear
                                                            | nn.ConvTranspose2d)]
    bits = get_format(fmt).bits
    out = []
    for _ in range(n):
        layer = rng.choice(layers)
        m = net.get_submodule(layer)
        target = "bias" if rng.random() < 0.2 else "weight"
        out.append(Fault(target, layer, rng.randrange(getattr(m, target).numel()),
                         (rng.randrange(bits),)))
    return out


def _check(name: str, fmt: str, n: int, inflate: float = 1.0,
           levels: tuple[float, ...] | None = None, rounding: str = "ulp") -> tuple[int, int]:
    net, x, task = _case(name)
    faults = _faults(net, fmt, n)
    fast = Engine(net, x, task, fmt=fmt, certify=True, batch_size=16).prepare()
    fast.certifier.rounding = rounding
    if inflate != 1.0:
        fast.certifier._radius = fast.certifier.radius() * inflate
    if levels is not None:
        fast.certifier.levels = levels
    sim = Engine(net, x, task, fmt=fmt, batch_size=16)
    got, ref = fast.run(faults), sim.run(faults)
    unsound = sum(1 for a, b in zip(got, ref, strict=True) if not a.same_decisions(b))
    for a, b in zip(got, ref, strict=True):
        if not a.n_certified:
            assert a == b  # simulated exactly as without certification
        else:
            assert a.n_images + a.n_certified == b.n_images
    return sum(a.n_certified for a in got) // len(x), unsound



CASES = [("cnn", "fp32"), ("cnn", "fp16"), ("cnn", "bf16"), ("cnn", "int8"), ("mlp", "fp32"),
         ("mlp", "bf16"), ("tolerance", "fp32"), ("cae-msgms", "fp32"), ("cae-ssim", "fp32"),
         ("cae-margin", "fp32")]


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_certified_faults_never_change_a_decision(name, fmt):
    n = 400 if name.startswith("cae") else 1500
    certified, unsound = _check(name, fmt, n)
    assert unsound == 0
    assert certified >= 0.05 * n  # not vacuous: >= 5 % of the (fault, image) pairs proven


def _cut_only(name: str, n: int, inflate: float = 1.0) -> tuple[int, int, int]:
    """Certification at cuts alone (no fault certified before simulation): certified
    (fault, image) pairs, unsound ones, and pairs dropped mid-way."""
    net, x, task = _case(name)
    faults = _faults(net, "fp32", n, seed=3)
    eng = Engine(net, x, task, certify=True, batch_size=16).prepare()
    cert = eng.certifier
    cert.image_mask = lambda *a: None  # type: ignore[method-assign]
    if inflate != 1.0:  # every image, also those near the threshold, gets a large radius
        cert._cuts = {k: np.full_like(v, v.max() * inflate) for k, v in cert.cut_radii().items()}
    got, ref = eng.run(faults), Engine(net, x, task, batch_size=16).run(faults)
    unsound = sum(1 for a, b in zip(got, ref, strict=True) if not a.same_decisions(b))
    assert all(a.n_images + a.n_certified == b.n_images for a, b in zip(got, ref, strict=True))
    return sum(a.n_certified for a in got), unsound, len(faults) * len(x)


@pytest.mark.parametrize("name", ["cnn", "mlp", "cae-msgms", "cae-margin"])
def test_cut_certificates_are_sound(name):
    # A simulated image is dropped at a cut once its measured change there is below the
    # cut's certificate; its decision must be what full simulation gives.
    certified, unsound, pairs = _cut_only(name, 400)
    assert unsound == 0
    assert certified >= 0.1 * pairs  # not vacuous


def test_a_loosened_cut_certificate_is_caught():
    # The CNN case, whose top-1 decisions many faults flip: cut radii 10^4 times the largest
    # on every image certify rows that simulation shows changed their decision.
    certified, unsound, _ = _cut_only("cnn", 400, inflate=1e4)
    assert unsound > 0 and certified > 0


def test_worst_case_rounding_is_sound_and_stricter():
    strict, unsound = _check("cnn", "fp32", 1500, rounding="worst-case")
    assert unsound == 0
    assert 0 < strict <= _check("cnn", "fp32", 1500)[0]


def test_certificates_round_trip(tmp_path):
    net, x, task = _case("mlp")
    eng = Engine(net, x, task, certify=True).prepare()
    path = eng.certifier.compute_all().save(tmp_path / "c.npz")
    other = Certifier(Engine(net, x, task).prepare()).load(path)
    for name in ("1", "3", "5"):
        assert np.array_equal(other.table(name), eng.certifier.table(name))
    assert np.array_equal(other.radius(), eng.certifier.radius())
    cuts = eng.certifier.cut_radii()
    assert cuts and other._cuts is not None and other._cuts.keys() == cuts.keys()
    assert all(np.array_equal(other.cut_radius(k), v) for k, v in cuts.items())
    with pytest.raises(ConfigError, match="images"):
        Certifier(Engine(net, x[:5], ClassificationTask(task.labels[:5])).prepare()).load(path)


def test_a_loosened_certificate_is_caught():
    """The soundness check has power: radii 10^4 times too large (and caps up to 4x the
    largest weight) certify faults that do change decisions, and simulation finds them."""
    certified, unsound = _check("cnn", "fp32", 1500, inflate=1e4, levels=(4.0, 2.0**-6))
    assert unsound > 0 and certified > 0


def test_certified_outcomes_and_criteria():
    g = Golden(kind="detection", n_images=10, accuracy=0.8, auroc=0.9)
    o = Outcome(n_certified=10, accuracy=0.8, flips_to_anomalous=0, flips_to_normal=0,
                auroc=0.9)
    assert classify(o, g, "any-flip") == "sdc-benign"
    assert classify(o, g, "accuracy-drop:0") == "sdc-benign"
    with pytest.raises(ConfigError, match="auroc-drop"):
        classify(o, g, "auroc-drop:0.01")
    assert Outcome.from_dict(o.to_dict()).certified


def test_uncertifiable_models_and_tasks_certify_nothing():
    net, x, task = _case("cnn")
    plain = DetectionTask(lambda a, b: b.flatten(1).amax(1), 0.0, [0] * 48)
    cert = Certifier(Engine(net, x, plain))
    assert cert.reason and "score_interval" in cert.reason
    f = _faults(net, "fp32", 1)[0]
    assert not cert.certifies(f, torch.tensor(0.0), torch.tensor(1e-30))

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, v):
            y = self.fc(v)
            return y * y  # a product of perturbed values: not followed by the bounds

    odd = Odd().eval()
    v = torch.randn(8, 4)
    c2 = Certifier(Engine(odd, v, ClassificationTask(odd(v).argmax(1))))
    lc = c2.certificate("fc")
    assert lc.reason and lc.reason.startswith("unsupported") and not lc.T.any()


def test_campaign_certify_classifies_as_simulation(tmp_path):
    from test_runner import make_tiny_run

    torch.set_num_threads(1)
    run = make_tiny_run(tmp_path)
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    args = ["--strata", "layer,bit", "--error", "0.3", "--confidence", "0.9", "--layers",
            "decoder.14,decoder.16", "--images", "6", "--json"]
    cli = CliRunner()
    a = cli.invoke(app, ["campaign", "run", str(run), *args, "--certify"])
    b = cli.invoke(app, ["campaign", "run", str(other), *args])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert 0 < json.loads(a.stdout)["certified_pairs"] < 1
    assert json.loads(b.stdout)["certified_pairs"] is None
    from flipguard.campaign.store import CampaignStore

    with CampaignStore(run / "campaign.sqlite") as s1, \
            CampaignStore(other / "campaign.sqlite") as s2:
        r1 = {pf.fault_id: Outcome.from_dict(r) for pf, r in s1.results()}
        r2 = {pf.fault_id: Outcome.from_dict(r) for pf, r in s2.results()}
    assert r1.keys() == r2.keys()
    g = Golden(kind="detection", n_images=6, accuracy=0.5)
    assert sum(o.n_certified for o in r1.values()) > 0
    assert len(list((run / "certificates").glob("*.npz"))) == 1  # computed once, then loaded
    for k, o in r1.items():
        assert o.same_decisions(r2[k])
        if not o.n_certified:
            assert o == r2[k]
    keys = ("n", "N", "critical", "cfr", "ci", "non_finite")
    for crit in ("any-flip", "accuracy-drop:0.01"):
        c1, c2 = (json.loads(cli.invoke(app, ["cfr", str(r), "--by", "layer", "--criterion",
                                              crit, "--json"]).stdout) for r in (run, other))
        assert [{k: row[k] for k in keys} for row in c1] == \
            [{k: row[k] for k in keys} for row in c2]
    assert np.isfinite(g.accuracy)


def test_layers_are_certified_only_where_the_faults_repay_it():
    net, x, task = _case("cnn")
    eng = Engine(net, x, task).prepare()
    few = Certifier(eng, faults={"4": 3})
    assert few.certificate("4").reason == "not worth it for 3 faults"
    assert not few.table("4").any()
    many = Certifier(eng, faults={"4": 10**6})
    assert many.certificate("4").reason is None and many.table("4").any()
    assert few.options() == many.options()  # one cache, whatever the campaign's size


def test_a_smaller_campaigns_cache_serves_a_larger_one(tmp_path):
    """Certificates saved by a campaign that skipped a layer as not worth it are reused by a
    larger campaign: only the skipped layer, now worth it, is computed; a campaign as small
    as the first finds nothing stale; a full cache is stale for no campaign."""
    net, x, task = _case("cnn")
    eng = Engine(net, x, task).prepare()
    few = Certifier(eng, faults={"4": 3}).compute_all()
    path = few.save(tmp_path / "c.npz")
    assert few.certificate("4").share is not None and few.stale() == []
    again = Certifier(eng, faults={"4": 3, "0": 3}).load(path)
    assert again.stale() == [] and again.certificate("4").reason == "not worth it for 3 faults"
    big = Certifier(eng, faults={"4": 10**6}).load(path)
    kept = {k: v.T for k, v in big._tables.items() if k != "4"}
    assert big.stale() == ["4"] and big.refresh() == ["4"] and big.stale() == []
    fresh = Certifier(eng, faults={"4": 10**6})
    assert big.certificate("4").reason is None
    assert np.array_equal(big.table("4"), fresh.table("4"))
    assert all(big._tables[k].T is v for k, v in kept.items())  # the others: not recomputed
    full = Certifier(eng).load(big.save(path))  # no fault counts: every layer pays
    assert sorted(full.stale()) == ["0", "7"] and sorted(full.refresh()) == ["0", "7"]
    full.save(path)
    for faults in ({"4": 3}, {"0": 10**6, "4": 10**6, "7": 10**6}, None):
        done = Certifier(eng, faults=faults).load(path)
        assert done.stale() == [] and all(v.reason is None for v in done._tables.values())


def test_padding_the_envelope_cannot_follow_is_not_certified():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="replicate"), nn.Flatten(),
                        nn.Linear(128, 3)).eval()
    x = torch.rand(8, 1, 8, 8)
    cert = Certifier(Engine(net, x, ClassificationTask(net(x).argmax(1))))
    lc = cert.certificate("0")
    assert lc.reason.startswith("unsupported") and not lc.T.any()
    assert cert.certificate("2").reason is None  # the Linear layer after it still certifies


def test_a_second_campaign_reuses_the_certificates(tmp_path, monkeypatch):
    """A campaign of another size on the same weights (a copy of the run with its cache)
    computes no cut radii and only the layers the first campaign skipped that now pay; both
    read one cache file, and the decisions are those of the first campaign's certificates."""
    from test_runner import make_tiny_run

    torch.set_num_threads(1)
    run = make_tiny_run(tmp_path)
    args = ["--strata", "layer", "--confidence", "0.9", "--layers", "decoder.14,decoder.16",
            "--images", "6", "--certify", "--json"]
    calls = {"cuts": 0, "layers": []}
    cuts, layer = Certifier._compute_cuts, Certifier._compute

    def count_cuts(self):
        calls["cuts"] += 1
        return cuts(self)

    def count_layer(self, name):
        calls["layers"].append(name)
        return layer(self, name)

    monkeypatch.setattr(Certifier, "_compute_cuts", count_cuts)
    monkeypatch.setattr(Certifier, "_compute", count_layer)
    cli = CliRunner()
    a = cli.invoke(app, ["campaign", "run", str(run), *args, "--error", "0.3"])
    assert a.exit_code == 0, a.output
    assert calls["cuts"] == 1 and len(calls["layers"]) >= 2
    (cache,) = (run / "certificates").glob("*.npz")
    with np.load(cache) as d:
        meta = json.loads(bytes(d["__meta__"]).decode())
    skipped = {k for k, v in meta.items() if k != "__cuts__" and v["share"] is not None}
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    (other / "campaign.sqlite").unlink()
    calls.update(cuts=0, layers=[])
    b = cli.invoke(app, ["campaign", "run", str(other), *args, "--error", "0.2"])
    assert b.exit_code == 0, b.output
    assert calls["cuts"] == 0 and calls["layers"]  # a skipped layer the larger plan repays
    assert set(calls["layers"]) <= skipped & {"decoder.14", "decoder.16"}
    assert [p.name for p in (other / "certificates").glob("*.npz")] == [cache.name]
    assert json.loads(b.stdout)["certified_pairs"] > 0
