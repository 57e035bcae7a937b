"""Would another memory layout or batch size make exact simulation cheaper? (BENCHMARKS §12)

    python benchmarks/bench_layout.py [RUN] [--images 679] [--threads 1] [--json] [--save F]

The engine's claim is bit-identical outcomes to a plain forward of the user's model, so a
faster arithmetic is only free where it gives the *same bits*. Per Conv/ConvTranspose layer of
RUN's model (default: ``build_cae()`` on random inputs): one batch of 64 through the layer as
stored (NCHW) and in channels-last (input and weight converted, output converted back), the
best of three wall times and whether the outputs are bit-identical; then the whole model over
``--images`` inputs at batch sizes 8/16/64, NCHW and channels-last, with bit identity to
NCHW at 64 (the engine's default batch).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _emit import emit
from torch import Tensor, nn

from flipguard.models.cae import build_cae
from flipguard.study.engines import RunEngineFactory

CL = torch.channels_last


def best_of(fn: Callable[[Tensor], Tensor], x: Tensor, repeat: int = 3) -> tuple[float, Tensor]:
    """Best wall time of ``repeat`` calls and the last output."""
    best, y = float("inf"), x
    for _ in range(repeat):
        t = time.perf_counter()
        y = fn(x)
        best = min(best, time.perf_counter() - t)
    return best, y


def channels_last_call(mod: nn.Module) -> Callable[[Tensor], Tensor]:
    """``mod``'s forward in channels-last, returning an NCHW tensor."""
    w = lambda: mod.weight.contiguous(memory_format=CL)  # noqa: E731 - read at call time
    if isinstance(mod, nn.ConvTranspose2d):
        return lambda z: F.conv_transpose2d(
            z.contiguous(memory_format=CL), w(), mod.bias, mod.stride, mod.padding,
            mod.output_padding, mod.groups, mod.dilation).contiguous()
    return lambda z: mod._conv_forward(z.contiguous(memory_format=CL), w(), mod.bias).contiguous()


def per_layer(model: nn.Module, x: Tensor) -> list[dict]:
    inputs: dict[str, Tensor] = {}
    convs = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in convs.items()]
    model(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, mod in convs.items():
        t0, y0 = best_of(mod, inputs[name])
        t1, y1 = best_of(channels_last_call(mod), inputs[name])
        rows.append({"layer": name, "nchw_ms": 1e3 * t0, "channels_last_ms": 1e3 * t1,
                     "speedup": t0 / t1, "bit_identical": bool(torch.equal(y0, y1))})
    return rows


def whole_model(model: nn.Module, x: Tensor) -> list[dict]:
    def run(m: nn.Module, bs: int, cl: bool) -> tuple[float, Tensor]:
        outs, t = [], time.perf_counter()
        for a in range(0, len(x), bs):
            z = x[a:a + bs]
            outs.append(m(z.contiguous(memory_format=CL) if cl else z).contiguous())
        return time.perf_counter() - t, torch.cat(outs)

    ref_t, ref = run(model, 64, False)
    rows = [{"layout": "nchw", "batch": 64, "seconds": ref_t, "bit_identical": True}]
    for bs in (8, 16):
        t, y = run(model, bs, False)
        rows.append({"layout": "nchw", "batch": bs, "seconds": t,
                     "bit_identical": bool(torch.equal(y, ref))})
    cl_model = model.to(memory_format=CL)  # converts this copy's weights (last use)
    for bs in (8, 16, 64):
        t, y = run(cl_model, bs, True)
        rows.append({"layout": "channels_last", "batch": bs, "seconds": t,
                     "bit_identical": bool(torch.equal(y, ref)),
                     "max_abs_diff": float((y - ref).abs().max())})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--images", type=int, default=679)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    factory = RunEngineFactory(a.run) if a.run else None
    model = (factory.model() if factory else build_cae()).eval()
    p = next(model.parameters())
    shape = tuple(factory.parts().inputs.shape[1:]) if factory else (1, 128, 128)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = torch.rand(a.images, *shape, generator=g, dtype=p.dtype)
        layers = per_layer(model, x[:64])
        models = whole_model(model, x)
    summary = {"run": a.run, "images": a.images, "threads": a.threads,
               "layers": layers, "whole_model": models}

    def text() -> str:
        out = ["layer         NCHW ms  channels-last ms  speedup  bit-identical"]
        out += [f"{r['layer']:<12} {r['nchw_ms']:8.1f} {r['channels_last_ms']:17.1f} "
                f"{r['speedup']:8.2f}  {r['bit_identical']}" for r in layers]
        out.append(f"whole model over {a.images} inputs:")
        out += [f"  {r['layout']:<13} batch {r['batch']:>2}: {r['seconds']:.3f} s  "
                f"bit-identical to NCHW/64: {r['bit_identical']}" for r in models]
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
