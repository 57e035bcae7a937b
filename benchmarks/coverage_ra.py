"""Coverage of RA intervals on toy populations with a known RA and rare heavy drops.

The population (:func:`toy_population`): four tensors (two weights, two activations) with
unequal, per-element exposure weights and 32 bits each (14,848 sites, enumerated exactly);
the drops mimic a network: exponent-MSB flips of weights cost 0.01–0.12 on 60 % of the
elements, lower exponent and sign bits a little, some activation flips *improve* the
accuracy (negative drops), and 0.4 % of the probability mass carries drops of 0.25–0.5:

* ``heavy="weight"``: the heavy sites sit in the exponent-MSB cell of the large weight
  tensor (a cell every start heuristic rates high);
* ``heavy="sign"``: they sit in the sign-bit cell of an activation (rated low by the
  ``bitfield`` start of the adaptive proposal: the adversarial case).

Each scenario runs ``R`` seeded estimations through :func:`flipguard.ra.estimate_ra` (the
same code path as ``flipguard ra``; evaluations are table lookups) with the old CLT
interval and the confidence sequences, sequentially to ±0.25 % at 95 % or at a fixed ``n``,
and reports how often the interval covers the exact RA (± 1.96 s.e., the s.e. from
``(k + 1) / (R + 2)`` so that 100 % still gets one), its mean width and the mean number of
samples. The old estimator is the CLT interval with the adaptive proposal's old fixed
defensive share; the new one the confidence sequence with the share tuned from the samples.
``scenarios(R, seed)`` returns the rows (``suite="ra"``) for ``benchmarks/bench_coverage.py``;
run alone (the digits rows need `runs/ra_digits/exhaustive.npz` from `bench_ra_classifier.py`):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/coverage_ra.py --replications 1000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = 0.95
HEAVY_MASS = 0.004
SPECS = (("weight", "conv", (16, 16), 3.0), ("weight", "fc", (64,), 1.0),
         ("activation", "conv", (8, 16), 1.6), ("activation", "fc", (16,), 0.3))


class Toy:
    """A toy population: ``p`` (SiteDistribution), per-site drops, the exact RA, and an
    evaluator ``self(sites) -> accuracies`` (table lookup)."""

    def __init__(self, p: Any, drops: dict, golden: float) -> None:
        self.p, self.golden = p, golden
        self.flat = np.concatenate([drops[k].reshape(-1) for k in p.keys])
        sizes = [b.numel * 32 for b in p.blocks]
        self.offset = dict(zip(p.keys, np.cumsum([0] + sizes[:-1]).tolist(), strict=True))
        sites, prob = p.enumerate()
        self.prob = prob
        self.drop = float(prob @ self.flat)
        self.ra = golden - self.drop

    def __call__(self, sites: Any) -> np.ndarray:
        if hasattr(self, "evaluate"):
            return self.evaluate(sites)
        off = np.array([self.offset[k] for k in sites.keys], np.int64)[sites.block]
        return self.golden - self.flat[off + sites.index * 32 + sites.bit]


def toy_population(heavy: str = "weight", golden: float = GOLDEN, seed: int = 12345) -> Toy:
    """The toy population (see the module docstring); ``heavy``: ``weight`` | ``sign``."""
    from flipguard.ra import Block, SiteDistribution, Term

    rng = np.random.default_rng(seed)
    blocks, drops = [], {}
    for target, layer, shape, scale in SPECS:
        e = rng.uniform(0.2, 2.0, shape) * scale
        blocks.append(Block(target, layer, shape, np.ones(32), [Term.full(e)]))
        n = int(np.prod(shape))
        d = np.zeros((n, 32))
        if target == "weight":
            d[:, 30] = np.where(rng.random(n) < 0.6, rng.uniform(0.01, 0.12, n), 0.0)
            for bit in (27, 28, 29):
                d[:, bit] = np.where(rng.random(n) < 0.15, rng.uniform(0.0, 0.01, n), 0.0)
            d[:, 31] = np.where(rng.random(n) < 0.1, rng.uniform(0.0, 0.004, n), 0.0)
        else:
            d[:, 30] = np.where(rng.random(n) < 0.4, rng.uniform(0.005, 0.06, n), 0.0)
            for bit in range(23, 30):
                d[:, bit] = np.where(rng.random(n) < 0.05, rng.uniform(-0.01, 0.01, n), 0.0)
        drops[(target, layer)] = d
    p = SiteDistribution(blocks, name=f"toy-{heavy}")
    key, bit = (("weight", "conv"), 30) if heavy == "weight" else (("activation", "conv"), 31)
    if heavy not in ("weight", "sign"):
        raise ValueError(f"heavy: expected 'weight' or 'sign', got {heavy!r}")
    blk = p.block(*key)
    site_p = blk.element_weights(np.arange(blk.numel)) / p.total  # bit weights are 1
    mass = 0.0
    for i in rng.permutation(blk.numel):
        if mass >= HEAVY_MASS:
            break
        drops[key][i, bit] = rng.uniform(0.25, 0.5)
        mass += site_p[i]
    return Toy(p, drops, golden)


def adaptive_q(toy: Toy, alpha: float, tune_alpha: bool = True) -> Any:
    """The adaptive proposal from a ``bitfield`` start (no model needed); ``tune_alpha``
    False: the old fixed defensive share."""
    from flipguard.ra import AdaptiveProposal, ProposalContext

    ctx = ProposalContext(golden_accuracy=toy.golden)
    return AdaptiveProposal(start="bitfield", tune_alpha=tune_alpha).mixture(toy.p, ctx, alpha)


def run(toy: Toy, estimator: str, interval: str, replications: int, seed: int, *,
        margin: float = 0.0025, n: int | None = None, alpha: float = 0.2,
        batch: int = 64) -> dict[str, float]:
    """``replications`` estimations (seeds ``seed, seed + 1, ...``): coverage of the exact
    RA, its standard error, mean interval width and mean samples. ``n``: fixed sample count
    (no stopping) instead of sequential stopping at ``margin``."""
    from flipguard.ra import estimate_ra

    make_q = getattr(toy, "make_q", None) or (lambda a, tune: adaptive_q(toy, a, tune))
    q = None if estimator == "mc" else make_q(alpha, interval != "clt")
    kw: dict[str, Any] = ({"target_margin": 0.0, "max_samples": n} if n else
                          {"target_margin": margin, "max_samples": 400_000})
    cover, widths, samples = [], [], []
    for r in range(replications):
        est = estimate_ra(toy.p, toy, toy.golden, q=q, min_samples=100, batch=batch,
                          seed=seed + r, weight_bound=None if q is None else 1 / alpha,
                          interval=interval, **kw)
        cover.append(est.ci[0] <= toy.ra <= est.ci[1])
        widths.append(est.ci[1] - est.ci[0])
        samples.append(est.samples)
    cov = float(np.mean(cover))
    tilde = (sum(cover) + 1) / (replications + 2)  # keeps the s.e. informative at 0 % / 100 %
    return {"coverage": cov, "se": math.sqrt(tilde * (1 - tilde) / replications),
            "mean_width": float(np.mean(widths)), "samples": float(np.mean(samples))}


SCENARIOS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("rare heavy drops, MC sequential to ±0.25 %", "weight", "mc", {}),
    ("rare heavy drops, adaptive IS sequential to ±0.25 %", "weight", "is", {}),
    ("heavy drops in a cell the start rates low, adaptive IS sequential to ±0.25 %", "sign",
     "is", {}),
    ("heavy drops in a cell the start rates low, adaptive IS fixed n = 256", "sign", "is",
     {"n": 256}),
    ("rare heavy drops, MC fixed n = 256", "weight", "mc", {"n": 256}),
)
def digits_population(out: str | Path = ROOT / "runs" / "ra_digits") -> Any | None:
    """The digits CNN of ``bench_ra_classifier.py`` under the systolic exposure model, with
    the exact RA from its cached exhaustive table (None when the table is not there); IS
    uses the adaptive proposal from the criticality-predictor start, as ``flipguard ra``."""
    out = Path(out)
    if not (out / "exhaustive.npz").is_file():
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_ra_classifier import ALL_TARGETS, FACTORY, Lookup, _context

    from flipguard.models import load_model
    from flipguard.ra import AdaptiveProposal, build_exposure

    torch.set_num_threads(1)
    net = load_model(FACTORY, str(out / "digits_cnn.pt"))
    blob = torch.load(out / "digits_test.pt", weights_only=True)
    x = blob["inputs"]
    with torch.no_grad():
        golden = float((net(x).argmax(1) == blob["labels"]).double().mean())
    table = Lookup(build_exposure(net, x[:1], "uniform", ALL_TARGETS),
                   np.load(out / "exhaustive.npz")["acc"])
    p = build_exposure(net, x[:1], "systolic", ("weight", "activation"))
    sites, prob = p.enumerate()
    pop = Toy.__new__(Toy)
    pop.p, pop.golden, pop.prob = p, golden, prob
    pop.drop = float(prob @ (golden - table(sites)))
    pop.ra = golden - pop.drop
    pop.evaluate = table
    ctx = _context(net, blob, table, golden, 0)
    cache: dict = {}

    def make_q(alpha: float, tune: bool) -> Any:
        if (alpha, tune) not in cache:
            cache[(alpha, tune)] = AdaptiveProposal(tune_alpha=tune).mixture(p, ctx, alpha)
        return cache[(alpha, tune)]

    pop.make_q = make_q
    return pop


LABEL = {"clt": "CLT (old)", "betting-cs": "betting CS (new)", "eb-cs": "empirical-Bernstein CS"}


DIGITS = (("digits CNN (systolic exposure, exhaustive table), MC sequential to ±0.25 %",
           "digits", "mc", {}),
          ("digits CNN (systolic exposure, exhaustive table), adaptive IS sequential to "
           "±0.25 %", "digits", "is", {}))


def scenarios(replications: int, seed: int = 0,
              intervals: tuple[str, ...] = ("clt", "betting-cs"),
              log: Callable[[str], None] | None = None,
              digits: str | Path | None = ROOT / "runs" / "ra_digits",
              digits_replications: int | None = 200) -> list[dict[str, Any]]:
    """Coverage rows (``suite, scenario, estimator, R, coverage, se, mean_width, note``) of
    the old CLT and the new intervals on every scenario; with the digits CNN's cached
    exhaustive table (``bench_ra_classifier.py``) also two rows on that real network, with
    ``min(replications, digits_replications)`` replications (an MC run there takes ~0.3 s)."""
    toys: dict[str, Any] = {h: toy_population(h) for h in ("weight", "sign")}
    todo = list(SCENARIOS)
    pop = digits_population(digits) if digits is not None else None
    if pop is not None:
        toys["digits"] = pop
        todo += list(DIGITS)
    rows = []
    for name, heavy, est, kw in todo:
        reps = replications if heavy != "digits" or digits_replications is None else min(
            replications, digits_replications)
        for interval in intervals:
            t = time.perf_counter()
            r = run(toys[heavy], est, interval, reps, seed, **kw)
            what = ("MC" if est == "mc" else "adaptive IS, α = 0.2 fixed" if interval == "clt"
                    else "adaptive IS, α ≥ 0.2 tuned")
            rows.append({"suite": "ra", "scenario": name, "estimator": f"{what}, "
                         f"{LABEL[interval]}", "R": reps, "coverage": r["coverage"],
                         "se": r["se"], "mean_width": r["mean_width"],
                         "note": f"{r['samples']:.0f} samples on average; exact RA "
                                 f"{toys[heavy].ra:.5f}"})
            if log is not None:
                log(f"{name} | {rows[-1]['estimator']}: {r['coverage']:.3f} "
                    f"({time.perf_counter() - t:.0f} s)")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    out = ["| scenario | estimator | R | coverage ± 1.96 s.e. | mean CI width | note |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['estimator']} | {r['R']} | "
                   f"{100 * r['coverage']:.1f} % ± {196 * r['se']:.1f} % | "
                   f"{100 * r['mean_width']:.2f} % | {r.get('note', '')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replications", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--intervals", default="clt,betting-cs",
                    help="comma list of clt, betting-cs, eb-cs")
    ap.add_argument("--digits", default=str(ROOT / "runs" / "ra_digits"),
                    help="digits CNN output dir of bench_ra_classifier.py ('' to skip)")
    ap.add_argument("--digits-replications", type=int, default=200)
    args = ap.parse_args(argv)
    rows = scenarios(args.replications, args.seed, tuple(args.intervals.split(",")),
                     lambda s: print(s, file=sys.stderr, flush=True), args.digits or None,
                     args.digits_replications)
    print(table(rows))
    print("\ncommand: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/coverage_ra.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
