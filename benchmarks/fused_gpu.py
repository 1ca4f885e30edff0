"""Speed of the fused conv's Triton kernel on CUDA against cuDNN (issue 11, point 5): per layer, one script.

    python benchmarks/fused_gpu.py [--dtypes fp32,bf16] [--batches 1,32] [--out benchmarks/fused-gpu.md]
    TRITON_INTERPRET=1 python benchmarks/fused_gpu.py --smoke     # the script's plumbing on CPU, no timing

The layers and sparsities of ``benchmarks/fused.py``; for each, the dense conv (cuDNN, ``cudnn.benchmark``
on, channels-last for bf16) against fused IP (DCT basis) and fused SP with ``order=ORDER_GPU`` (the Triton
kernel forced) and ``order=0`` (what the op picks: Triton or the dense conv, by the folded density rule of
``ipfx.ops.order``). Times are medians of CUDA-event timings, calls interleaved, ratios per turn against
dense in the same process. "folded" is the folded kernel's density: the Triton kernel's MACs over dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import torch  # noqa: E402

from ipfx.form.bases import dct_basis  # noqa: E402
from ipfx.ops import ORDER_AUTO, ORDER_GPU, SparseIPConv, gpu  # noqa: E402
from ipfx.ops.geometry import _conv_geometry, _output_spatial  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused import LAYERS, SPARSITIES  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fns: dict, reps: int, device: torch.device) -> dict:
    """Median milliseconds of each function and the median per-turn ratio to ``dense``."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end))
            else:  # --smoke: the calls ran; the numbers mean nothing
                fn()
                times[k].append(1.0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k} / dense": statistics.median(a / b for a, b in zip(times[k], times["dense"]))
                for k in fns if k != "dense"})
    return out


def folded_density(m: SparseIPConv, x: torch.Tensor) -> float:
    g = _conv_geometry(x, m.values, m.indices, m.basis, m.bias, m.weight_shape, m.stride, m.padding, m.dilation,
                       m.groups, m.transposed, m.output_padding)
    flat = lambda: m.indices.to(device=x.device, dtype=torch.int64)  # noqa: E731
    return gpu.folded_density(g, m.values, m.indices, flat, m.basis)


def run_one(name, c_in, c_out, k, stride, groups, hw, s, batch, dtype, device, reps, gen):
    K, pad = k * k, k // 2
    coeff = torch.randn(c_out, c_in // groups, K, generator=gen)
    coeff = coeff * (torch.rand(coeff.shape, generator=gen) >= s)
    geo = dict(weight_shape=(c_out, c_in // groups, k, k), stride=stride, padding=pad, groups=groups)
    ip = SparseIPConv.from_coefficients(coeff, dct_basis((k, k), torch.float32) if K > 1 else None, **geo).to(device)
    sp = SparseIPConv.from_coefficients(coeff, None, **geo).to(device)
    dense = torch.nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups, bias=False).eval().to(device, dtype)
    dense.weight.data.copy_(ip.to_dense_weight().to(dtype))
    x = torch.randn(batch, c_in, hw, hw, generator=gen).to(device, dtype)
    xd = x.contiguous(memory_format=torch.channels_last) if dtype == torch.bfloat16 else x
    if device.type == "cpu":  # --smoke: the op's CPU kernel never takes the Triton order, so call it directly
        def fused(m, order):
            return lambda: gpu_call(m, x)
    else:
        def fused(m, order):
            return lambda: m(x, order)
    fns = {"dense": lambda: dense(xd), "IP triton": fused(ip, ORDER_GPU), "SP triton": fused(sp, ORDER_GPU),
           "IP auto": fused(ip, ORDER_AUTO), "SP auto": fused(sp, ORDER_AUTO)}
    with torch.no_grad():
        ref = dense(xd).float()
        for key in ("IP triton", "SP triton"):
            err = (fns[key]().float() - (ref if key.startswith("IP") else _sp_ref(sp, x))).abs().max().item()
            assert err <= (1e-3 if dtype == torch.float32 else 0.1) * max(1.0, ref.abs().max().item()), (key, err)
        t = timed(fns, reps, device)
    return dict(layer=name, sparsity=s, batch=batch, dtype=str(dtype).replace("torch.", ""),
                ip_folded=folded_density(ip, x), sp_folded=folded_density(sp, x), **t)


def _sp_ref(sp: SparseIPConv, x):
    w = sp.to_dense_weight().to(x.device, x.dtype)
    return torch.nn.functional.conv2d(x, w, None, sp.stride, sp.padding, sp.dilation, sp.groups).float()


def gpu_call(m: SparseIPConv, x):
    from ipfx.ops.kernels import _order_gpu

    g = _conv_geometry(x, m.values, m.indices, m.basis, m.bias, m.weight_shape, m.stride, m.padding, m.dilation,
                       m.groups, m.transposed, m.output_padding)
    flat = lambda: m.indices.to(device=x.device, dtype=torch.int64)  # noqa: E731
    return _order_gpu(g, x.contiguous(), m.values, m.indices, flat, m.basis, _output_spatial(g, x.shape[2:]), m.bias)


def write(path: str, rows: list[dict], device_name: str) -> None:
    lines = ["# Fused conv on CUDA: Triton kernel against cuDNN", "",
             f"Device: {device_name}; torch {torch.__version__}. Command: `python benchmarks/fused_gpu.py "
             f"{' '.join(sys.argv[1:])}`. Ratios < 1 are faster than the dense conv.", "",
             "| layer | sparsity | batch | dtype | IP folded | SP folded | dense ms | IP triton | SP triton | IP auto | SP auto |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['sparsity']:g} | {r['batch']} | {r['dtype']} | {r['ip_folded']:.3f} | "
                     f"{r['sp_folded']:.3f} | {r['dense']:.3f} | {r['IP triton / dense']:.2f}x | "
                     f"{r['SP triton / dense']:.2f}x | {r['IP auto / dense']:.2f}x | {r['SP auto / dense']:.2f}x |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="one small layer on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused-gpu.md"))
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
        device, layers, sparsities, batches, dtypes, reps = (torch.device("cpu"), [("3x3 8->8 @6", 8, 8, 3, 1, 1, 6)],
                                                           (0.95,), (1,), ("fp32",), 1)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --smoke with TRITON_INTERPRET=1 to check the script on CPU)")
        torch.backends.cudnn.benchmark = True
        device, layers, sparsities, reps = torch.device("cuda"), LAYERS, SPARSITIES, args.reps
        batches, dtypes = [int(b) for b in args.batches.split(",")], args.dtypes.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, no timing)"
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layer in layers:
        for s in sparsities:
            for batch in batches:
                for dt in dtypes:
                    row = run_one(*layer, s, batch, DTYPES[dt], device, reps, gen)
                    rows.append(row)
                    print(f"{row['layer']} {s} b{batch} {dt}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in row.items() if k.endswith("/ dense")), flush=True)
                    write(args.out, rows, name)  # after each row: a run cut short keeps what it measured
    write(args.out, rows, name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
