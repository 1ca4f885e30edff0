"""ipfx's deployment form on CUDA against cuDNN and torch.compile dense, whole networks (issue 18, point 5).

    python benchmarks/deploy_gpu.py [--models resnet50,mobilenet_v3_large] [--sparsities 0.95,0.99]
                                    [--batches 1,32] [--dtypes fp32,bf16] [--rounds 7] [--calls 20]
                                    [--no-compile] [--budget 900] [--out benchmarks/deploy-gpu.md]
    python benchmarks/deploy_gpu.py --smoke      # the plumbing on CPU (resnet18, 64x64): no timing

Each network is built as ``benchmarks/peers.py`` builds it (torchvision, random weights rescaled to unit
std, batch norms calibrated; ``ipfx.transform``, global ``ipfx.prune(t, "magnitude", s)``, batch norms
calibrated again on the pruned weights), then moved to the GPU in each dtype and timed as:

- ``cuDNN dense``: ``ipfx.lower(t, target="dense")`` in eval mode (``cudnn.benchmark`` on; torch's default
  TF32 setting for convolutions, which is on), NCHW; ``cuDNN dense CL``: the same in channels_last;
- ``compile dense``: ``torch.compile`` of the dense model (Inductor's default mode; no TensorRT); with
  ``--cudagraphs`` also ``mode="reduce-overhead"`` (CUDA graphs), of this and of the fused form;
- ``ipfx fused``: the deployment form, ``ipfx.lower(t, target="fused", freeze=True)``, moved to the GPU: each
  conv runs the Triton kernel or cuDNN's conv by the folded-density rule of ``ipfx.ops.order``;
  ``ipfx fused, tuned``: the same with ``IPFX_AUTOTUNE=1`` (each conv times its orders once and keeps the
  fastest); ``ipfx fused, compile``: ``torch.compile`` of the deployment form (Inductor keeps the
  ``ipfx::ip_conv`` calls and compiles what lies between).

Rounds run every engine ``--calls`` calls in turn (two untimed calls first), the order rotated each round;
an engine's time in a round is its mean per call from CUDA events around its calls. Reported per engine:
the median time over rounds and the median of its per-round ratios to the fastest dense engine (those
above) of that round. Each engine's output is checked against the float32 dense model on the CPU:
max |y - y_ref| / max |y_ref|. Cases run until ``--budget`` seconds have passed (the rest are named as not
run). ``--out`` gets the markdown, the ``.json`` beside it every round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ipfx  # noqa: E402
from peers import calibrate_bn, recalibrate, torchvision_model, unit_scale  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSE = ("cuDNN dense", "cuDNN dense CL", "compile dense", "compile dense, CUDA graphs")


@contextlib.contextmanager
def autotuned():
    """``IPFX_AUTOTUNE=1`` while the block runs (the fused op reads it on every call)."""
    old = os.environ.get("IPFX_AUTOTUNE")
    os.environ["IPFX_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["IPFX_AUTOTUNE"]
        else:
            os.environ["IPFX_AUTOTUNE"] = old


def engines(dense, fused, x, compile_: bool, cudagraphs: bool) -> dict:
    """name -> zero-argument call on ``x`` (the channels_last engine: channels_last copies of model and input)."""
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = {"cuDNN dense": lambda: dense(x), "cuDNN dense CL": lambda: dense_cl(x_cl)}
    out.update(_compiled(dense, x, compile_, cudagraphs, "compile dense", "compile dense, CUDA graphs"))
    out["ipfx fused"] = lambda: fused(x)

    def tuned():
        with autotuned():
            return fused(x)
    out["ipfx fused, tuned"] = tuned
    out.update(_compiled(fused, x, compile_, cudagraphs, "ipfx fused, compile", "ipfx fused, compile CUDA graphs"))
    return out


def _compiled(model, x, compile_: bool, cudagraphs: bool, name: str, graphs_name: str) -> dict:
    """``torch.compile`` of ``model`` called on ``x``: Inductor's default mode as ``name`` where ``compile_``,
    ``mode="reduce-overhead"`` (CUDA graphs) as ``graphs_name`` where ``cudagraphs``."""
    out = {}
    for key, on, mode in ((name, compile_, "default"), (graphs_name, cudagraphs, "reduce-overhead")):
        if on:
            out[key] = functools.partial(torch.compile(model, mode=mode), x)
    return out


def _elapsed_ms(fn, calls: int, device: torch.device) -> float:
    """Mean milliseconds per call of ``calls`` calls: CUDA events on CUDA, the wall clock otherwise (--smoke:
    the calls ran; the numbers mean nothing)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def timed_rounds(fns: dict, rounds: int, calls: int, device: torch.device) -> list[dict]:
    """Per round, each engine's mean milliseconds per call (:func:`_elapsed_ms`, after two untimed calls), the
    engines' order rotated."""
    names = list(fns)
    out = []
    for r in range(rounds):
        times = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            fns[name](), fns[name]()
            times[name] = _elapsed_ms(fns[name], calls, device)
        out.append(times)
    return out


def rel_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run_case(name, dense_cpu, fused_cpu, x_cpu, dtype, device, args) -> dict:
    with torch.inference_mode():
        ref = dense_cpu(x_cpu)
    dense = copy.deepcopy(dense_cpu).to(device, dtype)
    fused = copy.deepcopy(fused_cpu).to(device, dtype)
    x = x_cpu.to(device, dtype)
    torch._dynamo.reset()  # each case compiles afresh (else recompilations pile up to dynamo's limit: eager)
    fns = engines(dense, fused, x, args.compile, args.cudagraphs)
    case = {"case": name, "checks": {}, "errors": {}}
    with torch.inference_mode():
        for engine, fn in list(fns.items()):
            try:
                t0 = time.perf_counter()
                case["checks"][engine] = rel_diff(fn(), ref)
                case.setdefault("first_call_s", {})[engine] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001  (an engine that fails is reported, the others still run)
                case["errors"][engine] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                del fns[engine]
        case["rounds"] = timed_rounds(fns, args.rounds, args.calls, device)
    ref_per_round = [min(r[e] for e in DENSE if e in r) for r in case["rounds"]]
    case["median_ms"] = {e: statistics.median(r[e] for r in case["rounds"]) for e in fns}
    case["ratio"] = {e: statistics.median(r[e] / b for r, b in zip(case["rounds"], ref_per_round)) for e in fns}
    return case


def build(mname: str, sparsities, size: int, seed: int):
    """(sparsity, dense model, frozen fused model) per sparsity, pruned further in ascending order."""
    torch.manual_seed(seed)
    model = torchvision_model(mname)
    unit_scale(model)
    calibrate_bn(model, size, seed)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, space="sp", example_inputs=(example,))
    for s in sorted(sparsities):
        ipfx.prune(t, "magnitude", s)
        recalibrate(t, model, size, seed + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense = ipfx.lower(t, target="dense").eval()
            fused = ipfx.lower(t, target="fused", freeze=True).eval()
        yield s, dense, fused


def write(path: str, info: dict, cases: list[dict], skipped: list[str], command: str) -> None:
    engines_seen = list(dict.fromkeys(e for c in cases for e in c["median_ms"]))
    lines = [f"# ipfx's deployment form on CUDA (`{command}`)", "",
             "Generated by `benchmarks/deploy_gpu.py`; see its docstring for what each engine is. "
             "Ratio: the median of per-round ratios to the fastest dense engine (cuDNN NCHW or "
             "channels_last, torch.compile dense) of the round; below 1 is faster.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "| case | " + " | ".join(engines_seen) + " |", "|---|" + "---:|" * len(engines_seen)]
    for c in cases:
        cells = [f"{c['median_ms'][e]:.3f} ms ({c['ratio'][e]:.2f}x)" if e in c["median_ms"] else "failed"
                 for e in engines_seen]
        lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    lines += ["", "Output checks (max |y - y_ref| / max |y_ref|, against float32 dense on the CPU):", "",
              "| case | " + " | ".join(engines_seen) + " |", "|---|" + "---:|" * len(engines_seen)]
    for c in cases:
        lines.append(f"| {c['case']} | " + " | ".join(f"{c['checks'][e]:.1e}" if e in c["checks"] else "-"
                                                      for e in engines_seen) + " |")
    errors = [f"- {c['case']}, {e}: {msg}" for c in cases for e, msg in c["errors"].items()]
    if errors:
        lines += ["", "Engines that failed:", "", *errors]
    if skipped:
        lines += ["", "Not run (out of --budget): " + ", ".join(skipped)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"machine": info, "command": command, "cases": cases, "not_run": skipped}, f, indent=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v3_large")
    p.add_argument("--sparsities", default="0.95,0.99")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--cudagraphs", action="store_true",
                   help="also torch.compile(mode='reduce-overhead') of the dense model and of the fused one (CUDA)")
    p.add_argument("--budget", type=float, default=900.0, help="seconds; later cases are not run")
    p.add_argument("--smoke", action="store_true", help="resnet18 at 64x64 on the CPU, one round: plumbing only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy-gpu.md"))
    args = p.parse_args(argv)
    command = "python benchmarks/deploy_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.models, args.size, args.rounds, args.calls, args.batches = "resnet18", 64, 1, 1, "1"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        p.error("needs a CUDA device (or --smoke)")
    else:
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    start, cases, skipped = time.perf_counter(), [], []
    for mname in args.models.split(","):
        for s, dense, fused in build(mname, sparsities, args.size, args.seed):
            for batch in batches:
                x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(batch))
                for dt in dtypes:
                    name = f"{mname} {s:.0%} b{batch} {dt}"
                    if time.perf_counter() - start > args.budget:
                        skipped.append(name)
                        continue
                    print(name, flush=True)
                    cases.append(run_case(name, dense, fused, x, DTYPES[dt], device, args))
                    c = cases[-1]
                    print("  " + "  ".join(f"{e} {c['median_ms'][e]:.3f}ms {c['ratio'][e]:.2f}x"
                                           for e in c["median_ms"]), flush=True)
                    if c["errors"]:
                        print("  failed: " + "; ".join(f"{e}: {m}" for e, m in c["errors"].items()), flush=True)
                    write(args.out, info, cases, skipped, command)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    write(args.out, info, cases, skipped, command)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
