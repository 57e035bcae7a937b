"""Benchmark: flipguard's fault engine vs a PyTorchFI 0.6.0 loop vs naive in-place injection.

The same uniformly sampled FP32 weight bit flips (uniform over all weight bits of the
Conv2d/ConvTranspose2d layers) are evaluated over the same images by
(a) PyTorchFI (``declare_weight_fi`` per fault: deepcopy + flip, then full forwards),
(b) naive in-place flip + full forward, (b') the same inside ``heap_reuse()`` (the glibc
setting flipguard uses, to separate its effect), (c) ``flipguard.inject.Engine``, (d) the
engine with certification (``Engine(certify=True)``: images whose decision is proven
unchanged are not simulated; the set-up of its certificates is timed apart). Phases (a)-(c)
must report identical outcomes, (d) identical decisions.
Each phase runs in its own subprocess (peak memory = its VmHWM); all phases must report
identical outcomes. The *bound* for exact evaluation is the forward FLOPs from the faulty
layer on (MACs counted analytically per conv layer), averaged over the faults, as a share of
a full forward; flipguard's time is compared with ``bound share x naive time``.

    python benchmarks/bench_engine.py --images 256 --faults 200 --size 128 --seed 0
    python benchmarks/bench_engine.py --run runs/demo --images 256 --faults 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flipguard.detect import Scorer  # noqa: E402
from flipguard.faults import Fault  # noqa: E402
from flipguard.inject import DetectionTask, Engine, inject, parse_criterion  # noqa: E402
from flipguard.inject.cache import heap_reuse  # noqa: E402
from flipguard.inject.graph import pad_rows, same_rows  # noqa: E402
from flipguard.inject.outcomes import Golden, Outcome  # noqa: E402
from flipguard.models import CAEConfig, build_cae  # noqa: E402

CONV = (nn.Conv2d, nn.ConvTranspose2d)
PHASES = ("pytorchfi", "naive", "naive-heap", "flipguard", "certify")


def setup(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, DetectionTask]:
    """Model, images and task (identical in every subprocess)."""
    if args.run:
        from flipguard.study.rundir import load_run

        run = load_run(args.run)
        ds = run.load_data()
        n = min(args.images, ds.test.shape[0])
        return run.model.eval(), ds.test[:n].contiguous(), DetectionTask(
            run.scorer.scores, run.threshold, ds.test_labels[:n],
            score_interval=run.scorer.score_interval)
    model = build_cae(CAEConfig(input_size=args.size, seed=args.seed)).eval()
    g = torch.Generator().manual_seed(args.seed)
    coarse = torch.rand(args.images, 1, args.size // 8, args.size // 8, generator=g)
    x = F.interpolate(coarse, size=(args.size, args.size), mode="bilinear", align_corners=False)
    labels = np.arange(args.images) % 2
    s = args.size // 8
    for i in np.flatnonzero(labels):  # a bright square "defect" on every other image
        r, c = (torch.randint(0, args.size - s, (2,), generator=g)).tolist()
        x[i, :, r : r + s, c : c + s] = 1.0
    scorer = Scorer()
    with torch.no_grad():
        scores = torch.cat([scorer.scores(x[a : a + args.batch_size],
                                          model(x[a : a + args.batch_size]))
                            for a in range(0, args.images, args.batch_size)])
    thr = float(np.quantile(scores.double().numpy(), 0.9))
    return model, x.contiguous(), DetectionTask(scorer.scores, thr, labels,
                                                score_interval=scorer.score_interval)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CONV)]


def sample_faults(model: nn.Module, n: int, seed: int) -> list[Fault]:
    """Uniform over all weight bits of the Conv/ConvT layers."""
    layers = conv_layers(model)
    sizes = np.array([m.weight.numel() * 32 for _, m in layers], dtype=np.int64)
    cum = np.cumsum(sizes)
    ks = np.random.default_rng(seed).integers(0, cum[-1], n)
    out = []
    for k in ks:
        li = int(np.searchsorted(cum, k, side="right"))
        local = int(k - (cum[li - 1] if li else 0))
        out.append(Fault("weight", layers[li][0], local // 32, (local % 32,)))
    return out


def macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each conv layer for one image (analytic)."""
    res: dict[str, int] = {}

    def hook(name: str):
        def h(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
            k = int(np.prod(m.weight.shape[2:]))
            if isinstance(m, nn.ConvTranspose2d):  # every input element scatters a kernel
                res[name] = inp[0][0].numel() * (m.out_channels // m.groups) * k
            else:
                res[name] = out[0].numel() * (m.in_channels // m.groups) * k
        return h

    hs = [m.register_forward_hook(hook(n)) for n, m in conv_layers(model)]
    with torch.no_grad():
        model(x[:1])
    for h in hs:
        h.remove()
    return res


def _flip(value: torch.Tensor, bit: int) -> torch.Tensor:
    w = value.detach().clone().reshape(1).view(torch.int32)
    w ^= torch.tensor([1 << bit], dtype=torch.int64).to(torch.int32) if bit < 31 else \
        torch.tensor([-(1 << 31)], dtype=torch.int32)
    return w.view(torch.float32)[0]


def _loop(faulty: Any, model: nn.Module, x: torch.Tensor, task: DetectionTask,
          faults: list[Fault], bs: int) -> tuple[list[dict[str, Any]], Golden, list[float]]:
    """Evaluate each fault by full forwards; ``faulty(fault)`` is a context manager giving
    the faulty model. Returns the outcome records, the golden facts and the [wall, CPU]
    seconds of the fault loop."""
    n = x.shape[0]

    def forward(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(pad_rows(x[a : a + bs], bs))[: min(bs, n - a)]
                          for a in range(0, n, bs)])

    with torch.no_grad():
        gold = forward(model)
        gfacts = task.image_facts(x, gold).numpy()
    golden = task.golden(gfacts, False)
    out = []
    t0 = _clock()
    for f in faults:
        with torch.no_grad(), faulty(f) as m:
            y = forward(m)
            changed = ~same_rows(y, gold)
            facts = gfacts.copy()
            if changed.any():
                idx = changed.nonzero().squeeze(1)
                facts[idx.numpy()] = task.image_facts(x[idx], y[idx]).numpy()
        n_changed = int(changed.sum())
        if n_changed == 0:
            o = Outcome(masked=True, n_images=n, **task.outcome_fields(gfacts, golden))
        else:
            o = Outcome(n_images=n, n_changed=n_changed,
                        nonfinite_outputs=bool((~torch.isfinite(y)).any()),
                        **task.outcome_fields(facts, golden))
        out.append(o.to_dict())
    return out, golden, _since(t0)


def _clock() -> list[float]:
    return [time.perf_counter(), time.process_time()]


def _since(t0: list[float]) -> list[float]:
    return [b - a for a, b in zip(t0, _clock(), strict=True)]


@contextmanager
def _naive(model: nn.Module, f: Fault) -> Iterator[nn.Module]:
    with inject(model, f):
        yield model


@contextmanager
def _pfi(pfi: Any, index: dict[str, tuple[int, tuple[int, ...]]], f: Fault
         ) -> Iterator[nn.Module]:
    # PyTorchFI numbers weight layers in model.modules() order and indexes the weight tensor
    # as stored (ConvTranspose2d: (in, out, kh, kw)).
    layer_num, shape = index[f.layer]
    c = [int(v) for v in np.unravel_index(f.index, shape)]
    yield pfi.declare_weight_fi(function=lambda w, idx: _flip(w[idx], f.bits[0]),
                                layer_num=[layer_num], k=[c[0]], dim1=[c[1]], dim2=[c[2]],
                                dim3=[c[3]])


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in this process; returns timings, peak memory and outcome records."""
    torch.set_num_threads(args.threads)
    model, x, task = setup(args)
    faults = sample_faults(model, args.faults, args.seed)
    bs = min(args.batch_size, x.shape[0])  # every phase runs chunks of exactly bs rows
    t0 = _clock()
    if args.phase == "pytorchfi":
        import logging

        from pytorchfi.core import fault_injection

        logging.disable(logging.INFO)
        pfi = fault_injection(model, bs, input_shape=list(x.shape[1:]),
                              layer_types=list(CONV), use_cuda=False)
        index = {n: (i, tuple(m.weight.shape)) for i, (n, m) in enumerate(conv_layers(model))}
        recs, golden, secs = _loop(lambda f: _pfi(pfi, index, f), model, x, task, faults, bs)
    elif args.phase in ("naive", "naive-heap"):
        with heap_reuse(args.phase == "naive-heap"):
            recs, golden, secs = _loop(lambda f: _naive(model, f), model, x, task, faults, bs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            eng = Engine(model, x, task, batch_size=bs, fault_batch=args.fault_batch,
                         cache_dir=tmp, certify=args.phase == "certify").prepare()
            cert_s = 0.0
            if eng.certifier is not None:  # certificates of every layer, timed apart
                t2 = _clock()
                for name, _ in conv_layers(model):
                    eng.certifier.certificate(name)
                cert_s = _since(t2)[0]
            t1 = _clock()
            recs = [o.to_dict() for o in eng.run(faults)]
            secs, golden = _since(t1), eng.golden
    setup_s = _since(t0)[0] - secs[0]
    out = {"phase": args.phase, "wall": secs[0], "cpu": secs[1], "setup_s": setup_s,
           "records": recs, "golden": golden.to_dict(), "vmhwm_mb": _vmhwm_mb()}
    if args.phase == "certify":
        out["certify_s"] = cert_s
        out["certified_images"] = sum(r["n_certified"] for r in recs) / max(1, len(recs))
    return out


def _same(a: dict[str, Any], b: dict[str, Any], decisions: bool) -> bool:
    """Identical outcomes, or with ``decisions`` identical decision fields."""
    if not decisions:
        return a == b
    return Outcome.from_dict(a).same_decisions(Outcome.from_dict(b))


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bound_share(model: nn.Module, x: torch.Tensor, faults: list[Fault]) -> float:
    """Mean over faults of (MACs from the faulty layer on) / (MACs of a full forward)."""
    per = macs(model, x)
    order = list(per)  # hooks fire in execution order
    total = sum(per.values())
    tail = {name: sum(per[m] for m in order[i:]) for i, name in enumerate(order)}
    return float(np.mean([tail[f.layer] / total for f in faults]))


def ideal_share(model: nn.Module, x: torch.Tensor, task: DetectionTask, faults: list[Fault],
                bs: int) -> float:
    """Measured (not counted) lower bound of run-from-layer: mean over faults of (time from
    the faulty layer's start to the end of the forward + scoring) / (forward + scoring),
    taken from timestamps of forward pre-hooks on one chunk (min of 3 runs)."""
    xb = x[:bs]
    best: dict[str, float] = {}
    stamps: dict[str, float] = {}
    hs = [m.register_forward_pre_hook(
        lambda mod, inp, n=n: stamps.__setitem__(n, time.perf_counter()))
        for n, m in conv_layers(model)]
    for _ in range(3):
        with torch.no_grad():
            t0 = time.perf_counter()
            y = model(xb)
            t1 = time.perf_counter()
            task.image_facts(xb, y)
            t2 = time.perf_counter()
        score = t2 - t1
        tails = {n: (t1 - t + score) / (t2 - t0) for n, t in stamps.items()}
        best = tails if not best else {n: min(best[n], v) for n, v in tails.items()}
    for h in hs:
        h.remove()
    return float(np.mean([best[f.layer] for f in faults]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--faults", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default=None, help="trained run directory (flipguard.study.rundir)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--fault-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        json.dump(phase(args), sys.stdout)
        return
    res: dict[str, dict[str, Any]] = {}
    for ph in args.phases.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--phase", ph]
        print(f"running {ph} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[ph] = json.loads(out)
    torch.set_num_threads(args.threads)
    model, x, task = setup(args)
    faults = sample_faults(model, args.faults, args.seed)
    share = bound_share(model, x, faults)
    ideal = ideal_share(model, x, task, faults, args.batch_size)
    ref = res.get("pytorchfi") or next(iter(res.values()))
    print(f"\n{args.faults} FP32 weight bit flips (uniform over all Conv/ConvT weight bits), "
          f"{x.shape[0]} images {tuple(x.shape[1:])}, batch {args.batch_size}, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| phase | set-up s | per fault ms (wall) | per fault ms (CPU) | faults/s | "
          "peak RSS MB | speed-up vs PyTorchFI (wall / CPU) | identical outcomes |")
    print("|---|---|---|---|---|---|---|---|")
    for ph, r in res.items():
        same = sum(_same(a, b, ph == "certify")
                   for a, b in zip(r["records"], ref["records"], strict=True))
        print(f"| {ph} | {r['setup_s']:.1f} | {1000 * r['wall'] / args.faults:.0f} | "
              f"{1000 * r['cpu'] / args.faults:.0f} | {args.faults / r['wall']:.2f} | "
              f"{r['vmhwm_mb']:.0f} | {ref['wall'] / r['wall']:.2f}x / "
              f"{ref['cpu'] / r['cpu']:.2f}x | {100 * same / args.faults:.1f} % |")
    if "certify" in res:
        c = res["certify"]
        print(f"\ncertify: certificates of all layers {c['certify_s']:.1f} s (in set-up); "
              f"{c['certified_images']:.1f} of {x.shape[0]} images per fault certified "
              f"(not simulated); the last column compares decisions")
    crit, golden = parse_criterion(None), Golden.from_dict(ref["golden"])
    classes = Counter(crit.classify(Outcome.from_dict(d), golden) for d in ref["records"])
    print(f"\nclasses under {crit.text}: {dict(sorted(classes.items()))}")
    if "naive" in res and "flipguard" in res:
        print(f"\nexact-evaluation bound: the forward MACs from the faulty layer on are "
              f"{100 * share:.1f} % of a full forward (mean over the faults)")
        for unit in ("wall", "cpu"):
            fg = res["flipguard"][unit] / args.faults
            for ph in ("naive", "naive-heap"):
                if ph in res:
                    naive = res[ph][unit] / args.faults
                    print(f"- {unit}, {ph}: bound {1000 * share * naive:.0f} ms per fault "
                          f"(share x {1000 * naive:.0f} ms); flipguard {1000 * fg:.0f} ms = "
                          f"{fg / (share * naive):.2f} x bound")
        print(f"- measured time from the faulty layer on + scoring (the decoder's "
              f"ConvTranspose layers cost more per MAC): {100 * ideal:.1f} % of naive, "
              f"i.e. at most {1 / ideal:.2f}x faster than naive without masking")


if __name__ == "__main__":
    main()
