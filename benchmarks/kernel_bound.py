"""Where the blocked SP kernel's time goes, per layer (issue 18, point 3): its fixed costs, and what the same
multiply-adds cost when the tile's input is in L1. (``roofline.py`` bounds a synthetic copy of the inner loop;
this times the kernel itself, ``conv_blocked``, taken apart.)

    python benchmarks/kernel_bound.py [--threads 2] [--batch 32] [--sparsities 95,99] [--rounds 7]
                                      [--nchw-batch 1] [--nchw-rounds 101] [--out benchmarks/kernel-bound.md]

For each ResNet layer of issue 18's per-layer targets, at a batch of a multiple of the lanes, in interleaved rounds
in one process (median times), every conv with exactly the same number of kept coefficients in each output
channel (chosen at random):
- ``dense``: torch's convolution of the dense weight (the reference of "reached", as in ``fused.py``);
- ``blocked``: the SP conv on the batch-blocked layout (``conv_blocked``, its input already blocked, as a
  program's previous step leaves it);
- ``nothing kept``: the same call with no coefficient kept: what the call costs besides its multiply-adds (the
  zero-padded copy of the input, the output's write, the loops);
- ``padded ahead``, ``nothing kept, padded ahead``: the same two on an input zero-padded beforehand (as it would
  be if the producing op wrote its output into a zero border): the conv's own padded copy left out (1x1: none);
- ``input in L1``: the same output, the same kept coefficients per output channel, from fewer input channels
  (the most whose window of a tile, ``((kh - 1) + 1) x (P - 1 + kw)`` vectors each, fits ``--l1`` bytes, and at
  least the kept ones), so the tile's input stays in L1 across the output channels.

At ``--nchw-batch`` (1; not a multiple of the lanes, so the NCHW direct path, ``conv_direct``):
- ``bound``: the bound native conv a deployed program calls (no Python); ``module``: the same through
  ``SparseIPConv``'s Python call (as ``fused.py`` times it); ``one kept``: the bound conv with one kept
  coefficient per output channel (its fixed costs: the padded copy, the output's write, the loops).

Reached: (dense time / time) x density, as ``fused.py`` reports it (torch's dense time swings between runs on
some layers, those @56 most: 3x3 64->64 @56 took 16.7 and 48.0 ms in one run). Per multiply-add: (blocked -
nothing kept) over the vector multiply-adds (kept coefficients x output positions x batch / lanes), in
nanoseconds of the whole machine (both threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ipfx.ops import blocked, native  # noqa: E402
from ipfx.ops.modules import SparseIPConv  # noqa: E402
from ipfx.ops.order import ORDER_NATIVE  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)
from fused import _blocked_conv, interleaved  # noqa: E402  (benchmarks/fused.py)
from roofline import LAYERS  # noqa: E402  (benchmarks/roofline.py: the layers of issue 18's per-layer targets)

TILE = 8  # output positions per tile (kBlockedTile in ipfx/ops/csrc/blocked.h)


def kept_weight(c_out: int, c_in: int, k: int, kept: int, gen: torch.Generator) -> torch.Tensor:
    """A (c_out, c_in, k, k) weight with exactly ``kept`` nonzero coefficients in each output channel."""
    w = torch.zeros(c_out, c_in * k * k)
    for o in range(c_out):
        cols = torch.randperm(c_in * k * k, generator=gen)[:kept]
        w[o, cols] = torch.randn(kept, generator=gen)
    return w.reshape(c_out, c_in, k, k)


def blocked_call(w: torch.Tensor, x: torch.Tensor, padded_ahead: bool = False):
    """``fused.py``'s blocked SP conv of ``w`` on ``x`` (padding k // 2; where ``padded_ahead``, none, on ``x``
    zero-padded here, once: the conv's own padded copy left out); a callable."""
    k = w.shape[-1]
    if padded_ahead:
        return _blocked_conv(w.flatten(2), k, 1, 0, 1, F.pad(x, (k // 2,) * 4))
    return _blocked_conv(w.flatten(2), k, 1, k // 2, 1, x)


def bound_call(w: torch.Tensor, x: torch.Tensor):
    """The SP conv of ``w`` on ``x`` (padding k // 2) as a deployed program calls it at a batch that is not a
    multiple of the lanes: the NCHW direct path's bound native conv (``ipfx.ops.library.conv_plan``'s
    ``bound`` kernel, every argument but the input worked out once), without the Python of a module call;
    a callable, or None where the plan is not the native kernel's."""
    k = w.shape[-1]
    sp = SparseIPConv.from_coefficients(w.flatten(2), None, weight_shape=tuple(w.shape), stride=1, padding=k // 2,
                                        groups=1)
    plan = sp._plan(x, ORDER_NATIVE)
    bound = getattr(plan, "bound", None)
    if bound is None:
        return None
    kernel, code, _ = bound
    return lambda: kernel(x, None, code)


@torch.no_grad()
def bench_nchw(batch: int, sparsity: float, rounds: int) -> list[dict]:
    """The same layers at a batch the blocked layout does not take (batch 1): the NCHW direct path, as a
    deployed program calls it (``bound``) and through the module's Python (``module``), and its fixed costs
    (``one kept``: one kept coefficient per output channel: the padded copy, the output's write, the loops)."""
    rows = []
    for name, c_in, c_out, k, size in LAYERS:
        gen = torch.Generator().manual_seed(0)
        kept = max(1, round((1 - sparsity) * c_in * k * k))
        x = torch.randn(batch, c_in, size, size, generator=gen)
        w = kept_weight(c_out, c_in, k, kept, gen)
        sp = SparseIPConv.from_coefficients(w.flatten(2), None, weight_shape=tuple(w.shape), stride=1,
                                            padding=k // 2, groups=1)
        fns = {"dense": lambda: F.conv2d(x, w, None, 1, k // 2), "module": lambda: sp(x),
               "bound": bound_call(w, x), "one kept": bound_call(kept_weight(c_out, c_in, k, 1, gen), x)}
        if fns["bound"] is None or fns["one kept"] is None:
            print(f"{name}: the plan is not the native kernel's; skipped", flush=True)
            continue
        t = {n: seconds for n, seconds in interleaved(fns, rounds, base="dense").items() if n in fns}
        density = kept / (c_in * k * k)
        row = dict(layer=name, sparsity=sparsity, batch=batch, kept_per_channel=kept,
                   **{f"{n} ms": v * 1e3 for n, v in t.items()},
                   reached=t["dense"] / t["bound"] * density, reached_module=t["dense"] / t["module"] * density,
                   reached_without_fixed=t["dense"] / max(1e-9, t["bound"] - t["one kept"]) * density)
        rows.append(row)
        print(f"{name} {sparsity:.0%} b{batch}: reached {row['reached']:.0%} (module {row['reached_module']:.0%}, "
              f"without the fixed costs {row['reached_without_fixed']:.0%}); "
              + ", ".join(f"{n} {v * 1e3:.4f} ms" for n, v in t.items()), flush=True)
    return rows


@torch.no_grad()
def bench(batch: int, sparsity: float, rounds: int, l1: int) -> list[dict]:
    rows = []
    lanes = blocked.lanes()
    for name, c_in, c_out, k, size in LAYERS:
        gen = torch.Generator().manual_seed(0)
        kept = max(1, round((1 - sparsity) * c_in * k * k))
        window = k * (TILE - 1 + k) * lanes * 4  # bytes of one channel's window of a tile (float32)
        c_l1 = min(c_in, max(l1 // window, math.ceil(kept / (k * k))))
        x = torch.randn(batch, c_in, size, size, generator=gen)
        x_l1 = torch.randn(batch, c_l1, size, size, generator=gen)
        w = kept_weight(c_out, c_in, k, kept, gen)
        fns = {
            "dense": lambda: F.conv2d(x, w, None, 1, k // 2),
            "blocked": blocked_call(w, x),
            "nothing kept": blocked_call(torch.zeros_like(w), x),
            "nothing kept, padded ahead": blocked_call(torch.zeros_like(w), x, padded_ahead=True),
            "padded ahead": blocked_call(w, x, padded_ahead=True),
            "input in L1": blocked_call(kept_weight(c_out, c_l1, k, kept, gen), x_l1),
        }
        t = {name: seconds for name, seconds in interleaved(fns, rounds, base="dense").items() if name in fns}
        density = kept / (c_in * k * k)
        fmas = kept * c_out * size * size * batch / lanes
        row = dict(layer=name, sparsity=sparsity, batch=batch, kept_per_channel=kept, l1_channels=c_l1,
                   **{f"{n} ms": v * 1e3 for n, v in t.items()},
                   reached=t["dense"] / t["blocked"] * density,
                   reached_in_l1=t["dense"] / t["input in L1"] * density,
                   reached_padded_ahead=t["dense"] / t["padded ahead"] * density,
                   reached_without_fixed=t["dense"] / max(1e-9, t["blocked"] - t["nothing kept"]) * density,
                   ns_per_fma=(t["blocked"] - t["nothing kept"]) / fmas * 1e9)
        rows.append(row)
        print(f"{name} {sparsity:.0%}: reached {row['reached']:.0%} (input in L1 {row['reached_in_l1']:.0%}, "
              f"padded ahead {row['reached_padded_ahead']:.0%}, "
              f"without the fixed costs {row['reached_without_fixed']:.0%}); "
              + ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in t.items()), flush=True)
    return rows


def write(path: str, rows: list[dict], args, seconds: float) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Where the blocked SP kernel's time goes (issue 18, point 3)", "",
        f"`python benchmarks/kernel_bound.py --threads {args.threads} --batch {args.batch} --sparsities "
        f"{args.sparsities} --rounds {args.rounds} --l1 {args.l1} --nchw-batch {args.nchw_batch} --nchw-rounds "
        f"{args.nchw_rounds}`: {cpu_name()}, {platform.system()}, torch "
        f"{torch.__version__}, {args.threads} threads, {seconds:.0f} s, load {load:.2f} at the end. Medians of "
        "interleaved rounds in one process.", "",
        "| layer | sparsity | kept per output channel | dense ms | blocked ms | nothing kept ms (padded ahead) | "
        "padded ahead ms | input in L1 ms (channels) | reached | reached, padded ahead | reached, input in L1 | "
        "reached without the fixed costs | ns per vector multiply-add |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if "blocked ms" in r):
        lines.append(f"| {r['layer']} | {r['sparsity']:.0%} | {r['kept_per_channel']} | {r['dense ms']:.3f} | "
                     f"{r['blocked ms']:.3f} | {r['nothing kept ms']:.3f} ({r['nothing kept, padded ahead ms']:.3f}) | "
                     f"{r['padded ahead ms']:.3f} | {r['input in L1 ms']:.3f} ({r['l1_channels']}) | "
                     f"{r['reached']:.0%} | {r['reached_padded_ahead']:.0%} | {r['reached_in_l1']:.0%} | "
                     f"{r['reached_without_fixed']:.0%} | {r['ns_per_fma']:.3f} |")
    nchw = [r for r in rows if "bound ms" in r]
    if nchw:
        lines += ["", f"## Batch {nchw[0]['batch']}: the NCHW direct path", "",
                  "| layer | sparsity | kept per output channel | dense ms | bound ms | module ms | one kept ms | "
                  "reached (bound) | reached (module) | reached without the fixed costs |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in nchw:
            lines.append(f"| {r['layer']} | {r['sparsity']:.0%} | {r['kept_per_channel']} | {r['dense ms']:.4f} | "
                         f"{r['bound ms']:.4f} | {r['module ms']:.4f} | {r['one kept ms']:.4f} | {r['reached']:.0%} | "
                         f"{r['reached_module']:.0%} | {r['reached_without_fixed']:.0%} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(args=vars(args), seconds=seconds, rows=rows), f, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="a multiple of the lanes (16 floats with AVX-512)")
    parser.add_argument("--sparsities", default="95,99", help="percent, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--l1", type=int, default=32 << 10, help="bytes of a tile's input that stay in L1")
    parser.add_argument("--nchw-batch", type=int, default=1,
                        help="also the NCHW direct path at this batch (0: not)")
    parser.add_argument("--nchw-rounds", type=int, default=101, help="rounds at that batch (its calls are short)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel-bound.md"))
    args = parser.parse_args(argv)
    if not native.available():
        raise SystemExit("kernel_bound.py needs the native kernel (`ipfx build-native`)")
    if args.batch <= 0 or args.batch % blocked.lanes():
        raise SystemExit(f"--batch must be a positive multiple of the lanes ({blocked.lanes()} here)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [r for s in args.sparsities.split(",") for r in bench(args.batch, int(s) / 100, args.rounds, args.l1)]
    if args.nchw_batch:
        rows += [r for s in args.sparsities.split(",")
                 for r in bench_nchw(args.nchw_batch, int(s) / 100, args.nchw_rounds)]
    write(args.out, rows, args, time.perf_counter() - start)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
