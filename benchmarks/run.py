"""ipfx benchmarks: every figure is a ratio against a baseline measured in the same process.

    python benchmarks/run.py [--quick] [--out benchmarks/report.md] [--threads N]

Sections: training step time (IP vs SP vs torch.nn.utils.prune vs dense), transform/lower time,
inference (lowered dense vs original; fused IP vs dense vs fused SP, per layer and end to end),
deployed size, and peak memory of a training step (IP vs SP, in fresh subprocesses). Timings are
medians over interleaved repetitions (variants take turns, so drift hits all of them alike).

Allocator: glibc returns large freed blocks to the system unless its (adaptive) mmap threshold has grown
past them, so a large temporary costs its page faults on some calls and not on others, depending on the
process's allocation history: a grouped conv with a 7 MB output took 0.5 ms or 4.1 ms in otherwise equal
processes. ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456`` (or jemalloc/tcmalloc)
makes such timings steady; the report names the threshold when it is set.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
import torchvision

import ipfx
from ipfx.experiments.models import build_model

KERNELS = (nn.Conv2d, nn.Linear)


# -- helpers ------------------------------------------------------------------------------------------
def interleaved(fns: dict, reps: int, warmup: int = 1, pairs: dict | None = None) -> dict:
    """Median seconds per call of each function, calls interleaved round-robin.

    ``pairs``: ``{"a / b": ("a", "b")}``; each gets the median of the per-turn ratios ``a_i / b_i``
    (calls made back to back), which drift on a shared machine disturbs less than a ratio of medians.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t) for name, t in times.items()}
    for label, (a, b) in (pairs or {}).items():
        out[label] = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return out


def torch_pruned(model: nn.Module, sparsity: float) -> nn.Module:
    """SP the torch way: torch.nn.utils.prune (forward pre-hooks computing weight = weight_orig * mask)."""
    model = copy.deepcopy(model)
    params = [(m, "weight") for m in model.modules() if isinstance(m, KERNELS)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.RandomUnstructured, amount=sparsity)
    return model


def ipfx_pruned(model: nn.Module, space: str, sparsity: float) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, space=space)
    if sparsity:
        ipfx.prune(t, "random", sparsity, seed=0)
    return t


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None)


def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 10, 3)


# -- sections -------------------------------------------------------------------------------------------
TRAIN_PAIRS = {"IP / SP": ("ipfx IP", "ipfx SP"), "SP / torch prune": ("ipfx SP", "torch.nn.utils.prune (SP)"),
               "IP / dense": ("ipfx IP", "dense")}


def bench_train(quick: bool) -> list[dict]:
    rows = []
    cases = [("CIFAR ResNet-20", resnet20, 128, 32, 3 if quick else 30),  # a 2% effect needs ~30 turns
             ("torchvision resnet50", resnet50, 4 if quick else 16, 224, 2 if quick else 12)]
    for name, build, batch, size, reps in cases:
        model = build().train()
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        variants = {
            "dense": model,
            "torch.nn.utils.prune (SP)": torch_pruned(model, 0.9),
            "ipfx SP": ipfx_pruned(model, "sp", 0.9),
            "ipfx IP": ipfx_pruned(model, "ip", 0.9),
        }
        t = interleaved({k: train_step_fn(m, x, y) for k, m in variants.items()}, reps, warmup=3, pairs=TRAIN_PAIRS)
        rows.append(dict(model=name, batch=batch, **t))
        del variants
        gc.collect()
        print(f"train step {name}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items() if k not in TRAIN_PAIRS)
              + "; " + ", ".join(f"{k} {t[k]:.3f}" for k in TRAIN_PAIRS), flush=True)
    return rows


def bench_prune(quick: bool) -> list[dict]:
    """Wall time of each one-shot method at 90% on CIFAR ResNet-20, relative to one training step (batch 128)."""
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    model = ipfx_pruned(resnet20().train(), "ip", 0.0)
    step = train_step_fn(copy.deepcopy(model), x, y)
    step_time = interleaved({"step": step}, 3 if quick else 5)["step"]
    rows = []
    for method in ("random", "magnitude", "snip", "grasp", "synflow"):
        times = []
        for _ in range(1 if quick else 2):
            fresh = copy.deepcopy(model)
            start = time.perf_counter()
            ipfx.prune(fresh, method, 0.9, data=[(x, y)], loss_fn=F.cross_entropy, example_inputs=x, seed=0)
            times.append(time.perf_counter() - start)
        rows.append(dict(method=method, seconds=min(times), train_step=step_time))
        print(f"prune {method}: {min(times):.2f} s = {min(times) / step_time:.1f} training steps", flush=True)
    return rows


def bench_transform_lower(quick: bool) -> list[dict]:
    rows = []
    for name in ("resnet50", "efficientnet_b0"):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        reps = 2 if quick else 3
        tt, td, tf = [], [], []
        for _ in range(reps):
            start = time.perf_counter()
            t = ipfx_pruned(model, "ip", 0.0)
            tt.append(time.perf_counter() - start)
            ipfx.prune(t, "random", 0.95, seed=0)
            start = time.perf_counter()
            ipfx.lower(t, "dense")
            td.append(time.perf_counter() - start)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ipfx.lower(t, "fused")
            tf.append(time.perf_counter() - start)
        x = torch.randn(1, 3, 224, 224)
        fwd = interleaved({"forward": lambda: model(x)}, 3)["forward"]
        rows.append(dict(model=name, transform=min(tt), lower_dense=min(td), lower_fused=min(tf), forward_b1=fwd))
        print(f"{name}: transform {min(tt):.2f} s, lower dense {min(td):.2f} s, fused {min(tf):.2f} s", flush=True)
    return rows


LAYERS = [  # (name, c_in, c_out, k, stride, spatial) typical of ResNet-50 at 224x224
    ("3x3 64->64 @56", 64, 64, 3, 1, 56),
    ("3x3 128->128 @28", 128, 128, 3, 1, 28),
    ("3x3 256->256 @14", 256, 256, 3, 1, 14),
    ("3x3 512->512 @7", 512, 512, 3, 1, 7),
    ("1x1 256->64 @56", 256, 64, 1, 1, 56),
    ("1x1 1024->256 @14", 1024, 256, 1, 1, 14),
]
SPARSITIES = (0.9, 0.95, 0.98, 0.99)


@torch.no_grad()
def bench_layers(quick: bool) -> list[dict]:
    rows = []
    for name, cin, cout, k, stride, size in LAYERS[:3] if quick else LAYERS:
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).eval()
        x = torch.randn(1, cin, size, size)
        for s in SPARSITIES[1:2] if quick else SPARSITIES:
            ip, sp = ipfx_pruned(conv, "ip", s), ipfx_pruned(conv, "sp", s)
            fused_ip, fused_sp, dense = ipfx.lower(ip, "fused"), ipfx.lower(sp, "fused"), ipfx.lower(ip, "dense")
            t = interleaved({"dense": lambda: dense(x), "fused IP": lambda: fused_ip(x),
                             "fused SP": lambda: fused_sp(x)}, 3 if quick else 7)
            P = (size // stride) ** 2
            nnz = int(ip.get_submodule("weight").mask.sum()) if hasattr(ip, "weight") else None
            K = k * k
            limit = (nnz * P + min(cin, cout) * K * K * P) if K > 1 else nnz * P
            rows.append(dict(layer=name, sparsity=s, dense_macs=cout * cin * K * P, ip_mac_limit=limit, **t))
            ip = sp = fused_ip = fused_sp = dense = None  # free before the next case (closures hold the names)
            gc.collect()
            print(f"layer {name} s={s}: " + ", ".join(f"{a} {b * 1000:.2f} ms" for a, b in t.items()), flush=True)
    return rows


@torch.no_grad()  # inference, as deployed: no autograd graph for any variant
def bench_end_to_end(quick: bool) -> list[dict]:
    rows = []
    model = resnet50().eval()
    for batch in (1,) if quick else (1, 32):
        x = torch.randn(batch, 3, 224, 224)
        for s in SPARSITIES[1:2] if quick else SPARSITIES:
            ip, sp = ipfx_pruned(model, "ip", s), ipfx_pruned(model, "sp", s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fused_ip, fused_sp = ipfx.lower(ip, "fused"), ipfx.lower(sp, "fused")
            dense = ipfx.lower(ip, "dense")
            same = torch.allclose(dense(x), ip(x), rtol=1e-3, atol=1e-4)
            t = interleaved({"original": lambda: model(x), "dense": lambda: dense(x), "fused IP": lambda: fused_ip(x),
                             "fused SP": lambda: fused_sp(x)}, 2 if quick else 3 if batch > 1 else 15)
            row = dict(batch=batch, sparsity=s, dense_equals_transformed=same, dense_bytes=state_bytes(dense),
                       fused_ip_bytes=state_bytes(fused_ip), fused_sp_bytes=state_bytes(fused_sp), **t)
            rows.append(row)
            print(f"resnet50 b={batch} s={s}: " + ", ".join(f"{a} {b * 1000:.0f} ms" for a, b in t.items())
                  + f"; fused {row['dense_bytes'] / row['fused_ip_bytes']:.1f}x smaller", flush=True)
            ip = sp = fused_ip = fused_sp = dense = None  # free before the next case (closures hold the names)
            gc.collect()
    return rows


# A fixed mmap threshold: glibc then returns every freed block above 64 KiB to the system at once (its
# default threshold grows as blocks are freed, and freed heap memory, e.g. left over from loading the
# model, would be reused by the step unseen). Resident memory then follows the live tensors.
PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def bench_memory(quick: bool) -> list[dict]:
    """Peak resident memory added by one training step (the first: activations, gradients and optimizer
    state), each variant in a fresh process that loads the prepared model (:func:`memory_probe`)."""
    import tempfile

    rows = []
    for name, build, batch in (("resnet20", resnet20, 128), ("resnet50", resnet50, 4 if quick else 16)):
        model = build().train()
        peaks = {}
        with tempfile.TemporaryDirectory() as tmp:
            for variant in ("dense", "ipfx SP", "ipfx IP"):
                m = model if variant == "dense" else ipfx_pruned(model, "sp" if "SP" in variant else "ip", 0.9)
                path = os.path.join(tmp, "model.pt")
                torch.save(m, path)
                size = 32 if name == "resnet20" else 224
                out = subprocess.run([sys.executable, __file__, "--memory-probe", path, str(batch), str(size)],
                                     capture_output=True, text=True, check=True, env=PROBE_ENV)
                peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["step_mb"]
                m = None
                gc.collect()
        rows.append(dict(model=name, batch=batch, **peaks))
        print(f"peak memory {name}: {peaks}", flush=True)
    return rows


def memory_probe(path: str, batch: int, size: int) -> None:
    """Run in a child with ``MALLOC_MMAP_THRESHOLD_`` set (see :func:`bench_memory`): peak resident memory
    of the step (``VmHWM``, reset just before it) minus the resident memory just before it."""
    import ctypes

    torch.set_num_threads(1)
    model = torch.load(path, weights_only=False).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    step = train_step_fn(model, x, y)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size
    step()
    print(json.dumps({"step_mb": round((_status_kb("VmHWM") - before) / 1024, 1)}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- report ---------------------------------------------------------------------------------------------
def ratio(a, b) -> str:
    return f"{a / b:.2f}x"


def _train_ratio(r: dict, label: str) -> float:
    a, b = TRAIN_PAIRS[label]
    return r.get(label, r[a] / r[b])  # older results have medians only


def targets(results: dict) -> list[str]:
    """The performance targets of the project (issue 6), each against what this run measured."""
    rows = []

    def add(target: str, measured: list[tuple[str, float]], limit: float, above: bool = False):
        if measured:
            ok = all((v >= limit) if above else (v <= limit) for _, v in measured)
            rows.append(f"| {target} | {'; '.join(f'{v:.2f}x ({w})' for w, v in measured)} | {'yes' if ok else 'no'} |")

    train = results.get("train", [])
    add("IP train step <= 1.10x SP", [(r["model"], _train_ratio(r, "IP / SP")) for r in train], 1.10)
    add("ipfx SP train step <= 1.05x torch.nn.utils.prune",
        [(r["model"], _train_ratio(r, "SP / torch prune")) for r in train], 1.05)
    for r in results.get("transform", []):
        if r["model"] == "resnet50":
            rows.append(f"| transform of resnet50 <= 1 s | {r['transform']:.2f} s | {'yes' if r['transform'] <= 1 else 'no'} |")
    e2e = [r for r in results.get("end_to_end", []) if r["sparsity"] == 0.95]
    add("fused resnet50 at 95% saved >= 8x smaller than dense",
        [(f"batch {r['batch']}", r["dense_bytes"] / r["fused_ip_bytes"]) for r in e2e if r["batch"] == 1], 8.0, above=True)
    add("fused resnet50 at 95%, batch-1 latency <= dense",
        [("batch 1", r["fused IP"] / r["dense"]) for r in e2e if r["batch"] == 1], 1.0)
    if not rows:
        return []
    return ["## Targets", "", "| target | measured | met |", "|---|---|---|", *rows, ""]


ALL_SECTIONS = "train,prune,transform,layers,end_to_end,memory"


def write_report(path: str, results: dict, args, seconds: float) -> None:
    lines = ["# ipfx benchmarks", "",
             f"Command: `python benchmarks/run.py{' --quick' if args.quick else ''}"
             f"{'' if args.sections == ALL_SECTIONS else ' --sections ' + args.sections}` "
             f"(threads: {torch.get_num_threads()}), {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min"
             + ("." if args.sections == ALL_SECTIONS else "; the other sections are kept from earlier runs (report.json)."),
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
             "CPU only. Times are medians of interleaved repetitions; compare ratios, not absolute times."
             + (f" Allocator: MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}."
                if "MALLOC_MMAP_THRESHOLD_" in os.environ else ""), ""]
    if args.quick:
        lines += ["**A `--quick` smoke run: 2-3 repetitions per case, so the ratios below are noise, not measurements.**", ""]
    lines += targets(results)
    train = results.get("train", [])
    if train:
        lines += ["## Training step (90% sparsity, SGD with momentum)", "",
                  "| model | batch | dense | torch prune (SP) | ipfx SP | ipfx IP | IP / SP | ipfx SP / torch prune | IP / dense |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in train:
            lines.append(f"| {r['model']} | {r['batch']} | {r['dense'] * 1e3:.0f} ms | {r['torch.nn.utils.prune (SP)'] * 1e3:.0f} ms "
                         f"| {r['ipfx SP'] * 1e3:.0f} ms | {r['ipfx IP'] * 1e3:.0f} ms | {_train_ratio(r, 'IP / SP'):.2f}x "
                         f"| {_train_ratio(r, 'SP / torch prune'):.2f}x | {_train_ratio(r, 'IP / dense'):.2f}x |")
        lines += ["", "Ratios are medians of per-turn ratios (the two steps run back to back).", ""]
        lines.append("")
    pr = results.get("prune", [])
    if pr:
        lines += ["## One-shot pruning at 90% (CIFAR ResNet-20, IP, one batch of 128 for SNIP/GraSP, SynFlow 100 rounds)", "",
                  "| method | wall time | in training steps (batch 128) |", "|---|---:|---:|"]
        for r in pr:
            lines.append(f"| {r['method']} | {r['seconds']:.2f} s | {r['seconds'] / r['train_step']:.1f} |")
        lines.append("")
    tl = results.get("transform", [])
    if tl:
        lines += ["## Transform and lower (95% random masks for lowering)", "",
                  "| model | transform | lower dense | lower fused | one batch-1 forward |", "|---|---:|---:|---:|---:|"]
        for r in tl:
            lines.append(f"| {r['model']} | {r['transform']:.2f} s | {r['lower_dense']:.2f} s | {r['lower_fused']:.2f} s "
                         f"| {r['forward_b1']:.2f} s |")
        lines.append("")
    layers = results.get("layers", [])
    if layers:
        lines += ["## Inference per layer (batch 1): fused IP and fused SP against the dense conv", "",
                  "| layer | sparsity | dense | fused IP | fused SP | fused IP / dense | IP MAC limit / dense MACs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in layers:
            lines.append(f"| {r['layer']} | {r['sparsity']:g} | {r['dense'] * 1e3:.2f} ms | {r['fused IP'] * 1e3:.2f} ms "
                         f"| {r['fused SP'] * 1e3:.2f} ms | {ratio(r['fused IP'], r['dense'])} "
                         f"| {r['ip_mac_limit'] / r['dense_macs']:.3f} |")
        lines.append("")
    e2e = results.get("end_to_end", [])
    if e2e:
        lines += ["## resnet50 end to end, and deployed size", "",
                  "| batch | sparsity | original | lowered dense | fused IP | fused SP | fused IP / dense | dense == transformed | dense size / fused IP size | dense size / fused SP size |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in e2e:
            lines.append(f"| {r['batch']} | {r['sparsity']:g} | {r['original'] * 1e3:.0f} ms | {r['dense'] * 1e3:.0f} ms "
                         f"| {r['fused IP'] * 1e3:.0f} ms | {r['fused SP'] * 1e3:.0f} ms | {ratio(r['fused IP'], r['dense'])} "
                         f"| {r['dense_equals_transformed']} | {r['dense_bytes'] / r['fused_ip_bytes']:.1f}x "
                         f"| {r['dense_bytes'] / r['fused_sp_bytes']:.1f}x |")
        lines.append("")
    mem = results.get("memory", [])
    if mem:
        lines += ["## Peak memory added by one training step (fresh process per variant, resident set growth)", "",
                  "| model | batch | dense | ipfx SP | ipfx IP | IP / SP |", "|---|---:|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['model']} | {r['batch']} | {r['dense']} MB | {r['ipfx SP']} MB | {r['ipfx IP']} MB "
                         f"| {ratio(r['ipfx IP'], max(r['ipfx SP'], 1e-9))} |")
        lines.append("")
    lines += FUSED_OP_SECTION
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)


FUSED_OP_SECTION = [
    "## Fused op: which evaluation order runs (cost model calibration) and the native kernel", "",
    "`ipfx.ops.ip_conv` with `order=0` picks basis-first (a), coefficients-first (b), the native tiled kernel or the "
    "rebuilt dense weight by a cost model of work and bytes (`ipfx/ops/order.py`, `COST_CONSTANTS`), a pure "
    "function of geometry, batch, dtype and nnz: no timing, the same numbers on every call. The constants were fitted "
    "once on this machine with", "",
    "    python benchmarks/calibrate.py --threads 1 --reps 7", "",
    "(one thread: the machine was shared, and two-thread timings then varied 10x as OpenMP barriers waited for "
    "preempted threads).", "",
    "which times every order on 92 layer problems, fits the constants by non-negative least squares on relative "
    "error and writes the fit's quality to `benchmarks/calibration.md` (and every timing to `calibration.json`). "
    "Timing-based choice only on request: `order=-1`, or `IPFX_AUTOTUNE=1`. Speed of the fused op per layer and end "
    "to end against dense and `torch.sparse`: `benchmarks/fused.md` (`python benchmarks/fused.py`).", "",
]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        memory_probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and cases (a smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "report.md"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default=ALL_SECTIONS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    results = {}
    previous = os.path.splitext(args.out)[0] + ".json"
    if args.sections != parser.get_default("sections") and os.path.exists(previous):
        with open(previous) as f:  # a partial rerun keeps the other sections' figures
            results = json.load(f)
    sections = {"train": bench_train, "prune": bench_prune, "transform": bench_transform_lower, "layers": bench_layers,
                "end_to_end": bench_end_to_end, "memory": bench_memory}
    for name in args.sections.split(","):
        results[name] = sections[name](args.quick)
        write_report(args.out, results, args, time.time() - started)
    print(f"wrote {args.out} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
