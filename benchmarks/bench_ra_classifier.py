"""Resiliency Accuracy of a small bring-your-own classifier, and MC vs IS at a tight margin.

The classifier: a small CNN (conv 1->8, conv 8->16, fc 256->10; 3.8k parameters) trained
for 30 epochs on scikit-learn's 8x8 digits (1,297 training images), evaluated on the other
500. Every single-bit flip of every weight, bias and activation site (139,904 sites) is
injected once with the flipguard Engine and cached in ``OUT/exhaustive.npz`` (about 8 min
on one core; reused when the model and data fingerprints match), so that

* RA under ``uniform`` / ``memory`` / ``systolic`` (weight-stationary 16x16 default) is known
  exactly, next to a Monte Carlo estimate with its interval;
* the per-injection variance of every fixed estimator is exact (enumeration), so the
  injections each needs for a *valid* interval of half-width ``m`` can be predicted
  (``samples_needed``: the betting confidence sequence with that variance, mean and term
  bound) next to the old normal-interval count ``(z * sd / m)^2``;
* sequential estimations to ``m`` (default +-0.25 % at 95 %) can be repeated over many seeds
  at no cost: an evaluation is a lookup of the cached Engine result of that site, and
  *injections* counts distinct sites (a site drawn twice is injected once, as with the
  store), pilot included; the interval is ``--interval`` (default the betting confidence
  sequence, valid under the stopping rule), with ``--compare-clt`` also the old normal
  interval (MC and the adaptive proposal with its old fixed defensive share); for IS also
  the smallest fixed ``n`` (multiple of the batch) whose root-mean-square error over the
  seeds is within ``m / z`` (needs the exact RA; no interval involved).

``--check`` also runs MC and adaptive IS once through ``resiliency_accuracy`` with real
injections (the API behind ``flipguard ra --model bench_ra_classifier:digits_cnn ...``).

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/bench_ra_classifier.py \\
        runs/ra_digits --seeds 50 --check --compare-clt
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _emit import emit
from scipy.stats import norm
from torch import nn

MODELS = ("uniform", "memory", "systolic")
ALL_TARGETS = ("weight", "bias", "activation")
FACTORY = "bench_ra_classifier:digits_cnn"


def digits_cnn() -> nn.Module:
    """Small CNN for 8x8 digits: conv(1->8, 3x3) - ReLU - conv(8->16, 3x3) - ReLU -
    fc(256->10)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 10))


def prepare(out: str | Path, epochs: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """Train the CNN (deterministic, seconds) and save ``digits_cnn.pt`` (state dict) and
    ``digits_test.pt`` (``{"inputs", "labels"}`` of the 500 test images) under ``out``;
    existing files are kept."""
    from sklearn.datasets import load_digits

    out = Path(out)
    wpath, dpath = out / "digits_cnn.pt", out / "digits_test.pt"
    if wpath.is_file() and dpath.is_file():
        return wpath, dpath
    out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1297], perm[1297:]
    torch.manual_seed(seed)
    net = digits_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    torch.save(net.state_dict(), wpath)
    torch.save({"inputs": x[te].contiguous(), "labels": y[te].contiguous()}, dpath)
    return wpath, dpath


def _fingerprint(net: nn.Module, blob: dict) -> str:
    h = hashlib.sha256()
    for t in [*net.state_dict().values(), blob["inputs"], blob["labels"]]:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Lookup:
    """Evaluator reading the cached Engine accuracy of each site; counts distinct sites."""

    def __init__(self, p_all, acc: np.ndarray) -> None:
        sizes = [b.numel * b.bit_weights.size for b in p_all.blocks]
        self.offset = dict(zip(p_all.keys, np.cumsum([0] + sizes[:-1]).tolist(), strict=True))
        self.acc, self.seen, self.calls = acc, set(), 0

    def flat(self, sites) -> np.ndarray:
        off = np.array([self.offset[k] for k in sites.keys], np.int64)[sites.block]
        return off + sites.index * 32 + sites.bit

    def __call__(self, sites) -> np.ndarray:
        f = self.flat(sites)
        self.seen.update(f.tolist())
        self.calls += len(f)
        return self.acc[f]

    def reset(self) -> None:
        self.seen, self.calls = set(), 0


def exhaustive_table(out: Path, net: nn.Module, blob: dict, evaluate, p_all) -> np.ndarray:
    """Accuracy of every site of ``p_all`` (cached in ``out/exhaustive.npz``)."""
    path, fp = out / "exhaustive.npz", _fingerprint(net, blob)
    if path.is_file():
        z = np.load(path)
        if str(z["fingerprint"]) == fp:
            return z["acc"]
    sites, _ = p_all.enumerate()
    acc = np.empty(len(sites))
    t0 = time.perf_counter()
    for a in range(0, len(sites), 4096):
        sl = np.arange(a, min(a + 4096, len(sites)))
        acc[sl] = evaluate(sites.take(sl))
        print(f"  exhaustive: {sl[-1] + 1}/{len(sites)} sites, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    np.savez(path, acc=acc, fingerprint=fp)
    return acc


def exact_variances(p, q, table: Lookup, golden: float) -> tuple[float, float, float]:
    """Exact ``(D, per-sample variance of MC, of IS with proposal q)`` by enumeration."""
    sites, prob = p.enumerate()
    d = golden - table.acc[table.flat(sites)]
    dm = float(np.sum(prob * d))
    var_mc = float(np.sum(prob * d ** 2) - dm ** 2)
    if q is None:
        return dm, var_mc, var_mc
    qq = q.prob(sites)
    var_is = float(np.sum(prob ** 2 * d ** 2 / qq) - dm ** 2)
    return dm, var_mc, var_is


def oracle_q(p, table: Lookup, golden: float, alpha: float):
    """The variance-optimal cell-constant proposal ``alpha P + (1-alpha) P x RMS(d | cell)``
    computed from the exhaustive table (a bound for what ``adaptive`` can learn)."""
    from flipguard.ra.proposal import _with_bits, defensive

    sites, prob = p.enumerate()
    d2 = (golden - table.acc[table.flat(sites)]) ** 2
    new = {}
    for i, b in enumerate(p.blocks):
        sel = sites.block == i
        m2 = np.bincount(sites.bit[sel], weights=prob[sel] * d2[sel], minlength=32)
        pc = np.bincount(sites.bit[sel], weights=prob[sel], minlength=32)
        new[b.key] = b.bit_weights * np.sqrt(np.divide(m2, pc, out=np.zeros(32), where=pc > 0))
    return defensive(p, _with_bits(p, new, "oracle"), alpha)


def make_q(name: str, p, ctx, alpha: float):
    from flipguard.ra import defensive, make_proposal

    if name == "oracle":
        return oracle_q(p, ctx.evaluate, ctx.golden_accuracy, alpha)
    if name == "adaptive-fixed":  # the adaptive proposal with its old fixed share alpha
        from flipguard.ra import AdaptiveProposal

        return AdaptiveProposal(tune_alpha=False).mixture(p, ctx, alpha)
    prop = make_proposal(name, **({"n": 2} if name == "pilot" else {}))
    mixture = getattr(prop, "mixture", None)
    return mixture(p, ctx, alpha) if callable(mixture) else defensive(
        p, prop.heuristic(p, ctx), alpha)


def _context(net, blob, table: Lookup, golden: float, seed: int):
    from flipguard.ra import ProposalContext

    return ProposalContext(net, blob["inputs"], blob["labels"].numpy(), "classification",
                           table, golden, "fp32", seed)


def proposal_for(name: str, p, table: Lookup, golden: float, args, net, blob):
    """``seed -> (q, pilot injections)``; built once unless it depends on the seed (pilot).
    An adaptive ``q`` is reset by every ``estimate_ra`` call."""
    if name == "mc":
        return lambda seed: (None, 0)
    cache: dict = {}

    def get(seed: int):
        key = seed if name == "pilot" else 0
        if key not in cache:
            table.reset()
            cache[key] = (make_q(name, p, _context(net, blob, table, golden, key), args.alpha),
                          len(table.seen))
        return cache[key]
    return get


def sequential(p, table: Lookup, golden: float, exact: float, get_q, args,
               interval: str | None = None, fixed: bool = True) -> dict:
    """``args.seeds`` sequential estimations to ``args.margin`` (mean samples, distinct
    injections with the pilot, coverage of the exact RA, mean half-width) and, with
    ``fixed``, fixed-size runs: the smallest ``n`` of a grid whose root-mean-square error
    over the seeds is within ``margin / z``."""
    from flipguard.ra import estimate_ra

    z = float(norm.ppf(0.5 + args.confidence / 2))
    rows = []
    for seed in range(args.seeds):
        q, pilot = get_q(seed)
        table.reset()
        bound = None if q is None else 1.0 / args.alpha
        est = estimate_ra(p, table, golden, q=q, target_margin=args.margin,
                          confidence=args.confidence, max_samples=args.max_samples,
                          min_samples=100, batch=args.batch, seed=seed, weight_bound=bound,
                          interval=interval or args.interval)
        rows.append({"samples": est.samples, "injections": len(table.seen) + pilot,
                     "pilot": pilot, "covered": est.ci[0] <= exact <= est.ci[1],
                     "ra": est.ra, "half_width": est.half_width,
                     "alpha": (q.summary()["alpha_mean"] if hasattr(q, "summary")
                               else None if q is None else args.alpha)})
    out = {"samples": float(np.mean([r["samples"] for r in rows])),
           "injections": float(np.mean([r["injections"] for r in rows])),
           "pilot": float(np.mean([r["pilot"] for r in rows])),
           "coverage": float(np.mean([r["covered"] for r in rows])),
           "half_width": float(np.mean([r["half_width"] for r in rows])),
           "ra_mean": float(np.mean([r["ra"] for r in rows])), "runs": len(rows)}
    if rows[0]["alpha"] is not None:
        out["alpha"] = float(np.mean([r["alpha"] for r in rows]))
    if get_q(0)[0] is None or not fixed:
        return out
    for n in range(args.batch, 40 * args.batch + 1, args.batch):
        err, inj = [], []
        for seed in range(args.seeds):
            q, pilot = get_q(seed)
            table.reset()
            est = estimate_ra(p, table, golden, q=q, target_margin=0.0, max_samples=n,
                              min_samples=2, batch=args.batch, seed=10_000 + seed,
                              weight_bound=1.0 / args.alpha, interval="clt")
            err.append(est.ra - exact)
            inj.append(len(table.seen) + pilot)
        rmse = float(np.sqrt(np.mean(np.square(err))))
        if z * rmse <= args.margin:
            out.update({"fixed_n": n, "fixed_injections": float(np.mean(inj)),
                        "fixed_rmse": rmse})
            break
    return out


def check_real(out: Path, net, blob, args) -> dict:
    """MC and adaptive IS to the margin with real injections (``resiliency_accuracy``)."""
    from flipguard.inject import ClassificationTask, Engine
    from flipguard.ra import RAConfig, RAStore, resiliency_accuracy

    res = {}
    for est in ("mc", "is"):
        engine = Engine(net, blob["inputs"], ClassificationTask(blob["labels"]))
        cfg = RAConfig(hardware="systolic", estimator=est, proposal="adaptive",
                       alpha=args.alpha, target_margin=args.margin, confidence=args.confidence,
                       max_samples=args.max_samples, batch=args.batch, seed=0,
                       interval=args.interval)
        store = RAStore(out / "check_ra.sqlite", {"model": "digits"}, fresh=True)
        t = time.perf_counter()
        r = resiliency_accuracy(engine, cfg, store)
        store.close()
        res[est] = {k: r[k] for k in ("ra", "ci", "half_width", "samples", "injections",
                                      "ess", "stopped", "interval")}
        res[est]["seconds"] = time.perf_counter() - t
    (out / "check_ra.sqlite").unlink(missing_ok=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory (model, data, exhaustive table)")
    ap.add_argument("--margin", type=float, default=0.0025, help="target half-width")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seeds", type=int, default=20, help="sequential runs per estimator")
    ap.add_argument("--alpha", type=float, default=0.2, help="defensive share of P in q")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-samples", type=int, default=200_000)
    ap.add_argument("--proposals",
                    default="adaptive,adaptive-fixed,criticality,bitfield,pilot,oracle",
                    help="IS proposals to compare (also: gradient)")
    ap.add_argument("--interval", default="betting-cs", help="betting-cs | eb-cs | clt")
    ap.add_argument("--compare-clt", action="store_true",
                    help="also run MC and the old adaptive (fixed alpha) with the old CLT")
    ap.add_argument("--check", action="store_true", help="also run real injections once")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    ap.add_argument("--save", default=None, help="also write the summary JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    from flipguard.inject import ClassificationTask, Engine
    from flipguard.models import load_model
    from flipguard.ra import EngineEvaluator, build_exposure
    from flipguard.ra.confseq import samples_needed

    out = Path(args.out)
    wpath, dpath = prepare(out)
    net = load_model(FACTORY, str(wpath))
    blob = torch.load(dpath, weights_only=True)
    x = blob["inputs"]
    ev = EngineEvaluator(Engine(net, x, ClassificationTask(blob["labels"])))
    golden = ev.golden_accuracy
    p_all = build_exposure(net, x[:1], "uniform", ALL_TARGETS)
    table = Lookup(p_all, exhaustive_table(out, net, blob, ev, p_all))
    z = float(norm.ppf(0.5 + args.confidence / 2))
    props = [s for s in args.proposals.split(",") if s]
    summary: dict = {"golden_accuracy": golden, "images": int(x.shape[0]),
                     "parameters": sum(t.numel() for t in net.parameters()),
                     "sites": int(table.acc.size), "margin": args.margin,
                     "confidence": args.confidence, "alpha": args.alpha, "models": {}}
    for hw in MODELS:
        t0 = time.perf_counter()
        p = build_exposure(net, x[:1], hw, ("weight", "activation"))
        sites, prob = p.enumerate()
        exact = float(golden - np.sum(prob * (golden - table(sites))))
        dm, var_mc, _ = exact_variances(p, None, table, golden)

        def valid_n(var: float, bound: float, dm: float = dm) -> int:
            return samples_needed(args.margin, var, dm, bound * (golden - 1), bound * golden,
                                  args.confidence)

        m: dict = {"share": p.shares(), "exact_ra": exact, "drop": golden - exact,
                   "sd_mc": math.sqrt(var_mc), "n_mc_clt": (z * math.sqrt(var_mc)
                                                            / args.margin) ** 2,
                   "n_mc": valid_n(var_mc, 1.0), "is": {}}
        get_mc = proposal_for("mc", p, table, golden, args, net, blob)
        m["mc_seq"] = sequential(p, table, golden, exact, get_mc, args)
        if args.compare_clt:
            m["mc_seq_clt"] = sequential(p, table, golden, exact, get_mc, args, "clt")
            get_old = proposal_for("adaptive-fixed", p, table, golden, args, net, blob)
            m["is_seq_clt"] = sequential(p, table, golden, exact, get_old, args, "clt",
                                         fixed=False)
        for name in props:
            get_q = proposal_for(name, p, table, golden, args, net, blob)
            r: dict = {}
            if not name.startswith("adaptive"):  # a fixed proposal: exact variance
                _, _, var_is = exact_variances(p, get_q(0)[0], table, golden)
                r.update({"sd": math.sqrt(var_is), "n_clt": (z * math.sqrt(var_is)
                                                             / args.margin) ** 2 + get_q(0)[1],
                          "n": valid_n(var_is, 1.0 / args.alpha) + get_q(0)[1]})
            if name == "oracle":  # the best defensive share for a valid interval
                from flipguard.ra.adaptive import SHARES

                best = min((valid_n(exact_variances(p, oracle_q(p, table, golden, a), table,
                                                    golden)[2], 1 / a), float(a))
                           for a in SHARES[SHARES >= args.alpha])
                r.update({"n_best": best[0], "alpha_best": best[1]})
            else:
                r["seq"] = sequential(p, table, golden, exact, get_q, args)
            m["is"][name] = r
        m["seconds"] = time.perf_counter() - t0
        summary["models"][hw] = m
    if args.check:
        summary["check"] = check_real(out, net, blob, args)
    from ra_classifier_report import report

    return emit(summary, args.save, args.json, lambda: report(summary, args, argv), float)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
