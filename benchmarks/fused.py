"""Speed of the fused sparse convolution (issue 11): per layer and end to end, against dense and torch.sparse.

    python benchmarks/fused.py [--threads 2] [--sections layers,e2e] [--layer-batches 1,32] [--quick]
                               [--out benchmarks/fused.md]

Per layer (ResNet 3x3 and 1x1 shapes, a depthwise and a strided layer) at batch 1 (and 32: ``--layer-batches``;
5 repetitions there, no torch.sparse baseline) and 90/95/98/99%:
the dense convolution (an ``nn.Conv2d`` with the folded weight, as ``ipfx.lower(model, "dense")`` deploys), fused IP (DCT basis) and fused SP (``ipfx.ops.SparseIPConv``, order
0: the cost model's choice; the chosen order is listed) and a ``torch.sparse`` baseline (the SP weight as a
CSR ``(c_out, c_in*K)`` matrix times ``F.unfold(x)``), and at batches of a multiple of the lanes fused SP on
the batch-blocked layout (``ipfx.ops.blocked``: what a deployed program runs there). End to end: torchvision resnet50 and
mobilenet_v3_large at batch 1 and 32, transformed, randomly pruned and lowered by ipfx (dense vs fused).

Every ratio is a median of per-turn ratios against dense, measured in the same process, calls interleaved.
"MAC limit" is the dense multiply-accumulates over the variant's (the speed-up the arithmetic allows);
"reached" is the measured speed-up over that limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import ipfx  # noqa: E402
from ipfx.form.bases import dct_basis  # noqa: E402
from ipfx.ops import SparseIPConv, blocked, native  # noqa: E402
from ipfx.ops.geometry import _conv_geometry, _output_spatial  # noqa: E402
from ipfx.ops.order import _modelled_order  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

# name, c_in, c_out, kernel, stride, groups, spatial
LAYERS = [
    ("3x3 64->64 @56", 64, 64, 3, 1, 1, 56),
    ("3x3 128->128 @28", 128, 128, 3, 1, 1, 28),
    ("3x3 256->256 @14", 256, 256, 3, 1, 1, 14),
    ("3x3 512->512 @7", 512, 512, 3, 1, 1, 7),
    ("1x1 256->64 @56", 256, 64, 1, 1, 1, 56),
    ("1x1 1024->256 @14", 1024, 256, 1, 1, 1, 14),
    ("dw3x3 240 @14", 240, 240, 3, 1, 240, 14),
    ("3x3 s2 128->128 @56", 128, 128, 3, 2, 1, 56),
]
SPARSITIES = (0.9, 0.95, 0.98, 0.99)
ORDER_NAMES = {1: "a", 2: "b", 3: "dense", 4: "native"}
BATCHES = (1, 32)


STAT = "median"  # or "min" (--stat): the minimum time of each and their ratio, for a machine other jobs share
#: interleaved turns per layer row at batch 1 and at larger batches (--turns): one call of each function a turn
TURNS = (21, 5)


def interleaved(fns: dict, reps: int, base: str) -> dict:
    """Median seconds of each function and median per-turn ratio to ``base`` (calls interleaved); with
    ``STAT == "min"`` the minimum seconds and the ratio of minima (other jobs only ever add time)."""
    for fn in fns.values():
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    if STAT == "min":
        out = {k: min(v) for k, v in times.items()}
        out.update({f"{k} / {base}": out[k] / out[base] for k in fns if k != base})
        return out
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k} / {base}": statistics.median(a / b for a, b in zip(times[k], times[base])) for k in fns if k != base})
    return out


def chosen_order(m: SparseIPConv, x: torch.Tensor) -> str:
    g = _conv_geometry(x, m.values, m.indices, m.basis, m.bias, m.weight_shape, m.stride, m.padding, m.dilation,
                       m.groups, m.transposed, m.output_padding)
    return ORDER_NAMES[_modelled_order(g, x, m.values, m.basis, _output_spatial(g, x.shape[2:]), native.supports(x))]


@torch.no_grad()
def bench_layers(quick: bool, batches=(1,)) -> list[dict]:
    rows = []
    for batch in batches:
        rows += _bench_layers_at(quick, batch)
    return rows


def _bench_layers_at(quick: bool, batch: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, c_in, c_out, k, stride, groups, hw in LAYERS[:2] if quick else LAYERS:
        K, pad = k * k, k // 2
        x = torch.randn(batch, c_in, hw, hw, generator=gen)
        p_out = ((hw + 2 * pad - k) // stride + 1) ** 2
        dense_macs = c_out * (c_in // groups) * K * p_out
        for s in SPARSITIES[1:2] if quick else SPARSITIES:
            coeff = torch.randn(c_out, c_in // groups, K, generator=gen)
            coeff = coeff * (torch.rand(coeff.shape, generator=gen) >= s)
            nnz = int(torch.count_nonzero(coeff))
            geo = dict(weight_shape=(c_out, c_in // groups, k, k), stride=stride, padding=pad, groups=groups)
            basis = dct_basis((k, k), torch.float32) if K > 1 else None
            ip = SparseIPConv.from_coefficients(coeff, basis, **geo)
            sp = SparseIPConv.from_coefficients(coeff, None, **geo)
            dense = torch.nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups, bias=False).eval()
            dense.weight.data.copy_(ip.to_dense_weight())  # what ipfx.lower(model, "dense") deploys
            csr = coeff.reshape(c_out, -1).to_sparse_csr() if groups == 1 and batch == 1 else None

            def torch_csr():
                cols = F.unfold(x, k, padding=pad, stride=stride)[0]  # (c_in*K, P)
                return (csr @ cols).reshape(1, c_out, -1)

            fns = {"dense": lambda: dense(x), "fused IP": lambda: ip(x),
                   "fused SP": lambda: sp(x)}
            if csr is not None:
                fns["torch CSR"] = torch_csr
            blocked_sp = _blocked_conv(coeff, k, stride, pad, groups, x)
            if blocked_sp is not None:
                fns["fused SP blocked"] = blocked_sp
            t = interleaved(fns, 5 if quick else TURNS[0] if batch == 1 else TURNS[1], "dense")
            ip_macs = (c_in * K * K * p_out + nnz * p_out) if K > 1 else nnz * p_out
            if groups > 1:  # the native kernel runs the folded kernel: K taps for each kept channel pair
                ip_macs = int((coeff != 0).any(-1).sum()) * K * p_out
            row = dict(layer=name, batch=batch, sparsity=s, nnz=nnz, dense_macs=dense_macs, ip_macs=ip_macs,
                       sp_macs=nnz * p_out,  # (per sample: the limits are ratios)
                       ip_order=chosen_order(ip, x), sp_order=chosen_order(sp, x), **t)
            rows.append(row)
            print(f"{name} b{batch} {s}: " + ", ".join(f"{a} {b:.3g}" for a, b in t.items() if "/" in a)
                  + f"  (IP {row['ip_order']}, SP {row['sp_order']})", flush=True)
    return rows


def _blocked_conv(coeff: torch.Tensor, k: int, stride: int, pad: int, groups: int, x: torch.Tensor):
    """The SP conv on the batch-blocked layout a program keeps between steps at a batch of a multiple of the
    lanes (``ipfx.ops.blocked``; its input already in that layout, as a previous step leaves it), or None at
    other batches or without the native kernel."""
    if not native.available() or x.shape[0] % blocked.lanes():
        return None
    c_out, K = coeff.shape[0], coeff.shape[2]
    a = coeff.reshape(c_out, -1)
    crow = torch.zeros(c_out + 1, dtype=torch.long)
    crow[1:] = (a != 0).sum(1).cumsum(0)
    rows, cols = a.nonzero(as_tuple=True)
    vals = a[rows, cols].contiguous()
    cols = (cols + (rows // (c_out // groups)) * (x.shape[1] // groups) * K).contiguous()
    out = (x.shape[2] + 2 * pad - k) // stride + 1
    xb = torch.ops.ipfx_native.to_blocked(x)
    conv = torch.ops.ipfx_native.conv_blocked
    return lambda: conv(xb, crow, cols, vals, None, c_out, [k, k], [stride] * 2, [pad] * 2, [1, 1], groups,
                        [out, out], None, 0)


def _pruned_lowered(model, space: str, sparsity: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, space=space)
        ipfx.prune(t, "random", sparsity, seed=0)
        return ipfx.lower(t, "fused"), (ipfx.lower(t, "dense") if space == "ip" else None)


@torch.no_grad()
def bench_e2e(quick: bool) -> list[dict]:
    rows = []
    models = {"resnet50": torchvision.models.resnet50, "mobilenet_v3_large": torchvision.models.mobilenet_v3_large}
    for mname, ctor in models.items():
        torch.manual_seed(0)
        model = ctor(weights=None).eval()
        for s in SPARSITIES[1:2] if quick else SPARSITIES:
            fused_ip, dense = _pruned_lowered(model, "ip", s)
            fused_sp, _ = _pruned_lowered(model, "sp", s)
            for batch in (1,) if quick else BATCHES:
                x = torch.randn(batch, 3, 224, 224)
                t = interleaved({"dense": lambda: dense(x), "fused IP": lambda: fused_ip(x),
                                 "fused SP": lambda: fused_sp(x)}, 2 if quick else (3 if batch > 1 else 11), "dense")
                rows.append(dict(model=mname, batch=batch, sparsity=s, **t))
                print(f"{mname} b{batch} {s}: " + ", ".join(f"{a} {b:.3g}" for a, b in t.items() if "/" in a), flush=True)
            fused_ip = fused_sp = dense = None
            gc.collect()
    return rows


def _row_name(r: dict) -> str:
    """A layer row's layer (and its batch, past 1), or an end-to-end row's model and batch."""
    if "layer" in r:
        return r["layer"] + (f" b{r['batch']}" if r.get("batch", 1) > 1 else "")
    return f"{r['model']} b{r['batch']}"


def targets(results: dict) -> list[str]:
    """Issue 11's targets against the measured ratios (all ratios against dense, same process)."""
    layers, e2e = results.get("layers", []), results.get("e2e", [])
    rows = []

    def add(target, measured, limit):
        if measured:
            worst = max(v for _, v in measured)
            rows.append(f"| {target} | " + "; ".join(f"{v:.2f}x ({k})" for k, v in measured)
                        + f" | {'yes' if worst <= limit else 'no'} |")

    resnet3x3 = [r for r in layers if r["layer"].startswith("3x3 ") and " s2 " not in r["layer"]
                 and r.get("batch", 1) == 1]
    for s, limit in ((0.95, 0.6), (0.99, 0.35)):
        add(f"3x3 ResNet layers, batch 1, fused IP <= {limit}x dense at {s:.0%}",
            [(r["layer"], r["fused IP / dense"]) for r in resnet3x3 if r["sparsity"] == s], limit)
    for batch, s, limit in ((1, 0.95, 0.6), (1, 0.99, 0.4), (32, 0.95, 0.85)):
        add(f"resnet50 batch {batch}, fused IP <= {limit}x dense at {s:.0%}",
            [("IP", r["fused IP / dense"]) for r in e2e if r["model"] == "resnet50" and r["batch"] == batch
             and r["sparsity"] == s], limit)
    every = [(f"{_row_name(r)} {r['sparsity']}", r) for r in layers + e2e]
    # (not the 1x1 layers: with one tap there is no basis, so their IP and SP modules are the same computation,
    # and the ratio of two timings of it is noise around 1)
    sp_slower = [(k, r["fused SP / dense"] / r["fused IP / dense"]) for k, r in every if not k.startswith("1x1 ")]
    add("fused SP at least as fast as fused IP (SP time / IP time <= 1, worst 3 of the layers with a basis)",
        sorted(sp_slower, key=lambda kv: -kv[1])[:3], 1.0)
    slowest = sorted(((f"{k} {v}", r[f"fused {v} / dense"]) for k, r in every for v in ("IP", "SP")),
                     key=lambda kv: -kv[1])[:3]
    add("nothing slower than dense (fused / dense <= 1, worst 3)", slowest, 1.0)
    if not rows:
        return []
    return ["## Targets (issue 11)", "", "| target | measured | met |", "|---|---|---|", *rows, ""]


#: Issue 18's per-layer targets: the fraction of the MAC limit the fused SP kernel reaches ("reached" below) on
#: the ResNet 3x3 and 1x1 layers, batch 1 and 32, 2 threads.
KERNEL_TARGETS = {0.95: 0.50, 0.99: 0.35}


def kernel_targets(results: dict) -> list[str]:
    """Issue 18's per-layer targets (:data:`KERNEL_TARGETS`) against the measured fractions of the MAC limit."""
    layers = [r for r in results.get("layers", []) if r["layer"].startswith(("3x3 ", "1x1 "))
              and " s2 " not in r["layer"] and r["sparsity"] in KERNEL_TARGETS]
    rows = []
    for batch in sorted({r.get("batch", 1) for r in layers}):
        for s, want in KERNEL_TARGETS.items():
            got = [(r["layer"], r["dense_macs"] / max(1, r["sp_macs"]) * r["fused SP / dense"]) for r in layers
                   if r.get("batch", 1) == batch and r["sparsity"] == s]
            if got:
                rows.append(f"| batch {batch}, fused SP at {s:.0%}: at least {want:.0%} of the MAC limit | "
                            + "; ".join(f"{1 / v:.0%} ({k})" for k, v in got)
                            + f" | {'yes' if all(1 / v >= want for _, v in got) else 'no'} |")
            got = [(r["layer"], r["dense_macs"] / max(1, r["sp_macs"]) * r["fused SP blocked / dense"])
                   for r in layers if r.get("batch", 1) == batch and r["sparsity"] == s
                   and "fused SP blocked / dense" in r]
            if got:
                rows.append(f"| batch {batch}, fused SP on the blocked layout at {s:.0%}: at least {want:.0%} of the "
                            "MAC limit | " + "; ".join(f"{1 / v:.0%} ({k})" for k, v in got)
                            + f" | {'yes' if all(1 / v >= want for _, v in got) else 'no'} |")
    if not rows:
        return []
    return ["## Per-layer kernel targets (issue 18)", "", "| target | reached | met |", "|---|---|---|", *rows, ""]


def _load_line(load) -> str:
    """The machine's load as measured around the run (``os.getloadavg``'s 1-minute average, which counts this
    benchmark's own threads too), or that it was not recorded (a report rewritten from an older json)."""
    if not load:
        return "Load not recorded. "
    return (f"Load average (1 min, this benchmark's threads included) {load['start']:.2f} at the start, "
            f"{load['end']:.2f} at the end. ")


def write(path: str, results: dict, args, seconds: float) -> None:
    lines = ["# Fused sparse convolution: speed against dense (issue 11)", "",
             f"Command: `python benchmarks/fused.py --threads {args.threads}"
             f"{' --quick' if args.quick else ''} --sections {args.sections}"
             f"{' --stat min' if getattr(args, 'stat', 'median') == 'min' else ''}"
             f"{' --batches ' + args.batches if getattr(args, 'batches', '1,32') != '1,32' else ''}"
             f"{' --layer-batches ' + args.layer_batches if getattr(args, 'layer_batches', '1') != '1' else ''}"
             f"{' --turns ' + args.turns if getattr(args, 'turns', '21,5') != '21,5' else ''}"
             f"{'' if os.path.basename(path) == 'fused.md' else ' --out benchmarks/' + os.path.basename(path)}`, "
             f"{time.strftime('%Y-%m-%d')}, "
             f"{seconds / 60:.1f} min. Machine: {results.get('cpu', platform.machine())}, {os.cpu_count()} cores, "
             f"threads {args.threads}; torch {torch.__version__}; native kernel "
             + (f"built ({results['vector_bytes']}-byte vectors). " if results.get("vector_bytes")
                else f"{'built' if native.available() else 'NOT available'}. ")
             + _load_line(results.get("load"))
             + ("Ratios of minimum times over the repetitions, same process. "
                if getattr(args, "stat", "median") == "min" else "Ratios are medians of per-turn ratios, same process. ")
             + "Issue 11's targets are for 2 threads; with another job holding a core, two-thread medians are "
             "dominated by OpenMP barrier stalls (a 3x3 conv's median 10x its minimum, for dense and fused alike): "
             "run it alone.", ""]
    if args.quick:
        lines += ["**A `--quick` run: few repetitions, the ratios are noise.**", ""]
    lines += targets(results)
    lines += kernel_targets(results)
    layers = results.get("layers", [])
    for batch in sorted({r.get("batch", 1) for r in layers}):
        lines += [f"## Per layer, batch {batch}", "",
                  "| layer | sparsity | dense | fused IP / dense | IP MAC limit | IP reached | fused SP / dense "
                  "| SP MAC limit | SP reached | SP blocked / dense | SP blocked reached | torch CSR / dense "
                  "| IP order | SP order |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in (r for r in layers if r.get("batch", 1) == batch):
            lim_ip, lim_sp = r["dense_macs"] / r["ip_macs"], r["dense_macs"] / max(1, r["sp_macs"])
            ip, sp = r["fused IP / dense"], r["fused SP / dense"]
            csr = f"{r['torch CSR / dense']:.2f}x" if "torch CSR / dense" in r else "n/a"
            spb = r.get("fused SP blocked / dense")
            blocked_cells = f"{spb:.2f}x | {100 / spb / lim_sp:.0f}%" if spb else "n/a | n/a"
            lines.append(f"| {r['layer']} | {r['sparsity']} | {r['dense'] * 1e3:.2f} ms | {ip:.2f}x | {lim_ip:.1f}x "
                         f"| {100 / ip / lim_ip:.0f}% | {sp:.2f}x | {lim_sp:.0f}x | {100 / sp / lim_sp:.0f}% "
                         f"| {blocked_cells} | {csr} | {r['ip_order']} | {r['sp_order']} |")
        lines.append("")
    if layers:
        lines += ["IP MAC limit: dense MACs / (c_in K K P + nnz P) (order (a)); grouped IP (run as its folded "
                  "kernel): dense MACs / (K P per kept channel pair); SP: dense MACs / (nnz P). "
                  "Reached: (dense time / fused time) / limit. SP blocked: the SP conv on the batch-blocked layout "
                  "a deployed program keeps between steps at a batch of a multiple of the lanes (its input already "
                  "in it; n/a at other batches). torch CSR: the SP weight as a CSR matrix times "
                  "`F.unfold(x)` (n/a for grouped convs and at batch > 1).", ""]
    e2e = results.get("e2e", [])
    if e2e:
        lines += ["## End to end (ipfx.transform -> random prune -> ipfx.lower)", "",
                  "| model | batch | sparsity | dense | fused IP / dense | fused SP / dense |", "|---|---:|---:|---:|---:|---:|"]
        for r in e2e:
            lines.append(f"| {r['model']} | {r['batch']} | {r['sparsity']} | {r['dense'] * 1e3:.1f} ms "
                         f"| {r['fused IP / dense']:.2f}x | {r['fused SP / dense']:.2f}x |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(results=results, args={k: v for k, v in vars(args).items() if k != "from_json"},
                       seconds=seconds, threads=args.threads), f, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="layers,e2e")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="median per-turn ratios (default) or ratios of minimum times (a shared machine)")
    parser.add_argument("--batches", default="1,32", help="end-to-end batch sizes")
    parser.add_argument("--layer-batches", default="1", help="per-layer batch sizes (issue 18: 1,32)")
    parser.add_argument("--turns", default="21,5", help="interleaved turns per layer row at batch 1, at larger "
                        "batches (one call of each a turn; more turns, steadier medians)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused.md"))
    parser.add_argument("--from-json", help="rewrite the report from an earlier run's json, measuring nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        if "results" not in saved:  # the bare results of an earlier version of this script
            saved = dict(results=saved, args=dict(threads=args.threads, sections=args.sections, quick=False,
                                                  out=args.out), seconds=float("nan"))
        write(args.out, saved["results"], argparse.Namespace(**saved["args"]), saved["seconds"])
        return
    torch.set_num_threads(args.threads)
    global STAT, BATCHES, TURNS
    STAT, BATCHES = args.stat, tuple(int(b) for b in args.batches.split(","))
    TURNS = tuple(int(t) for t in args.turns.split(","))
    native.available()  # build (or load) before timing
    start = time.time()
    results = {"load": {"start": os.getloadavg()[0]}, "cpu": cpu_name(),
               "vector_bytes": native.vector_bytes() if native.available() else None}
    sections = args.sections.split(",")
    if "layers" in sections:
        results["layers"] = bench_layers(args.quick, tuple(int(b) for b in args.layer_batches.split(",")))
    if "e2e" in sections:
        results["e2e"] = bench_e2e(args.quick)
    results["load"]["end"] = os.getloadavg()[0]
    write(args.out, results, args, time.time() - start)


if __name__ == "__main__":
    main()
