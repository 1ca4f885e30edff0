"""What bounds the fused SP kernel per layer on this machine (issue 18, point 3): its inner loop's rate, memory.

    python benchmarks/roofline.py [--threads 2] [--out benchmarks/roofline.md]

Issue 18 asks the native direct sparse convolution (SP) to reach 50% (95% sparsity) and 35% (99%) of its "MAC
limit" on the ResNet 3x3 and 1x1 layers, the limit being torch's dense time over the kept fraction of the
multiply-accumulates (``benchmarks/fused.py``): that is, to run each kept multiply-add at half (or a third) of
the speed torch's dense conv runs its own. Two things bound that here, each measured by this script:

1. **The inner loop.** The kernel does one kept coefficient as NV = 8 unaligned loads of the input (a tile
   of 8 vectors of the CPU's width, 32 bytes with AVX2 and 64 with AVX-512, at the coefficient's tap offset)
   and 8 multiply-adds into the tile's accumulators: one load per multiply-add, where a dense conv reuses each
   load across many (register blocking). Timed alone here (``_LOOP``, compiled with
   ``torch.utils.cpp_extension`` at the native kernel's width, one thread) with its reads spread over buffers
   of L1, L2 and memory size, against torch's dense conv's time per multiply-add; once with the offsets as
   they come (a tap's offset is any number, so nearly every load spans two cache lines at 64 bytes) and once
   rounded down to whole vectors: what a layout whose taps all start on a vector boundary would allow.
2. **Memory.** Every call reads the input channels some kept coefficient uses and writes the output; at
   batch 32 these are tens of MiB, past the caches (L3: 8 MiB on the AVX2 machine of roofline.md, 32 MiB on
   the AVX-512 one of roofline-epyc-zen5-avx512.md), so the call cannot be faster than those bytes over the
   memory bandwidth (a 2-thread copy of 256 MiB, read and write).

For each layer: the fraction of the MAC limit the loop's L1 and L2 rates allow (no other work, no memory
stall), the L2 rate with aligned reads, and the fraction the memory bound allows; the target is out of reach
where a bound that applies is below it. (roofline.md was written by the first version of this script, 32-byte
vectors whatever the machine, on the AVX2 machine.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

from fused import KERNEL_TARGETS as TARGETS, LAYERS as FUSED_LAYERS  # noqa: E402  (benchmarks/fused.py)
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

# name, c_in, c_out, kernel, spatial (stride 1, "same" padding): the layers of issue 18's per-layer targets,
# fused.py's ungrouped, unstrided ResNet layers
LAYERS = [(name, c_in, c_out, k, hw) for name, c_in, c_out, k, stride, groups, hw in FUSED_LAYERS
          if stride == 1 and groups == 1]

# The kernel's inner loop (csrc/ip_conv.cpp: sparse_accumulate with one chain, as DirectPlan::channel runs it
# for a tile of 8 vectors): for each entry, 8 vectors at x + src[e] times vals[e] into acc. VECTOR_BYTES is
# the native kernel's width.
_LOOP = r"""
#include <torch/extension.h>
#include <chrono>
typedef float V __attribute__((vector_size(VECTOR_BYTES), aligned(4)));
double ns_per_fma(torch::Tensor x, torch::Tensor src, torch::Tensor vals, int64_t reps) {
  constexpr int L = VECTOR_BYTES / 4;
  const float* xp = x.data_ptr<float>();
  const int64_t* sp = src.data_ptr<int64_t>();
  const float* vp = vals.data_ptr<float>();
  const int64_t n = src.numel();
  V acc[8] = {};
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t e = 0; e < n; ++e) {
      const float w = vp[e];
      const V* p = reinterpret_cast<const V*>(xp + sp[e]);
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] += w * p[v];
    }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sum = 0;
  for (int v = 0; v < 8; ++v) for (int l = 0; l < L; ++l) sum += acc[v][l];
  if (sum == 42.0f) return -1;  // (keeps the loop)
  return s / (double(reps) * n * 8 * L) * 1e9;
}
"""

#: buffer sizes (KiB) the loop's reads are spread over
LOOP_KIB = (8, 24, 128, 448, 4096, 65536)


def vector_bytes() -> int:
    """The native kernel's vector width (ipfx.ops.native.vector_bytes; the kernel is built for it)."""
    from ipfx.ops import native
    native.available()
    return native.vector_bytes()


def loop_rates(width: int) -> dict:
    """{(KiB, aligned): ns per multiply-add} of the kernel's inner loop on vectors of ``width`` bytes, one
    thread, reads spread over buffers of LOOP_KIB sizes at offsets as they come or rounded down to whole
    vectors (the best of 5 runs of 20000 entries x 50)."""
    module = cpp_extension.load_inline(f"ipfx_roofline_loop_{width}", cpp_sources=_LOOP, functions=["ns_per_fma"],
                                       extra_cflags=["-O3", "-march=native", f"-DVECTOR_BYTES={width}"],
                                       verbose=False)
    lanes = width // 4
    rates = {}
    for aligned in (False, True):
        gen = torch.Generator().manual_seed(0)
        for kib in LOOP_KIB:
            n_in = kib * 1024 // 4
            x = torch.ones(n_in + 8 * lanes + lanes)
            x = x[(-x.data_ptr() // 4) % lanes:]  # (the buffer starts on a vector boundary)
            src = torch.randint(0, n_in, (20000,), generator=gen)
            if aligned:
                src = src // lanes * lanes
            vals = torch.full((20000,), 0.5)
            rates[kib, aligned] = min(module.ns_per_fma(x, src, vals, 50) for _ in range(5))
    return rates


def dense_rate(threads: int) -> dict:
    """ns per multiply-add (per thread) of torch's dense conv on each layer, batch 1, best of 11."""
    out = {}
    with torch.no_grad():
        for name, c_in, c_out, k, hw in LAYERS:
            conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False).eval()
            x = torch.randn(1, c_in, hw, hw)
            conv(x)
            best = min(_timed(lambda: conv(x)) for _ in range(11))
            out[name] = best * threads / (c_in * c_out * k * k * hw * hw) * 1e9
    return out


def bandwidth() -> float:
    """Bytes per second of a 256 MiB copy (read and write counted), best of 5, at torch's thread count."""
    a = torch.ones(64 * 2**20)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() * 4 / min(_timed(lambda: b.copy_(a)) for _ in range(5))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bounds(loops: dict, dense: dict, bw: float, threads: int) -> list[dict]:
    """Per layer, sparsity and batch: the fraction of the MAC limit (dense time / kept fraction, over the
    fused time) allowed by the inner loop alone at its L1 rate (24 KiB) and at its L2 rate (448 KiB), with
    the offsets as they come and aligned, and by memory alone (input channels read, the output written).
    Expected counts under uniform random pruning, as benchmarks/fused.py prunes."""
    rows = []
    for name, c_in, c_out, k, hw in LAYERS:
        K, P = k * k, hw * hw
        for s, target in TARGETS.items():
            for batch in (1, 32):
                macs = c_in * c_out * K * P * batch
                limit_time = dense[name] * macs * (1 - s) / threads  # ns: the time at the MAC limit
                loop = {key: limit_time / (ns * (1 - s) * macs / threads) for key, ns in loops.items()}
                read = c_in * (1 - s ** (c_out * K))  # input channels some kept coefficient reads
                memory_time = (read + c_out) * P * 4 * batch / bw * 1e9
                rows.append(dict(layer=name, sparsity=s, batch=batch, target=target, loop=loop[24, False],
                                 loop_l2=loop[448, False], aligned_l2=loop[448, True],
                                 memory=limit_time / memory_time, bytes=(read + c_out) * P * 4 * batch))
    return rows


def write(path: str, loops: dict, dense: dict, bw: float, rows: list, threads: int, width: int,
          seconds: float) -> None:
    lines = ["# What bounds the fused SP kernel per layer (issue 18, point 3)", "",
             f"Command: `python benchmarks/roofline.py --threads {threads}`, {time.strftime('%Y-%m-%d')}, "
             f"{seconds:.0f} s. Machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; the "
             f"native kernel's vectors: {width} bytes. Load average (1 min) {os.getloadavg()[0]:.2f} at the end. "
             "See the script's docstring for what is measured.", "",
             "## The kernel's inner loop, one thread", "",
             "| reads spread over | ns per multiply-add, offsets as they come | offsets on whole vectors |",
             "|---:|---:|---:|",
             *[f"| {kib} KiB | {loops[kib, False]:.3f} | {loops[kib, True]:.3f} |" for kib in LOOP_KIB], "",
             "## torch's dense conv, batch 1", "", "| layer | ns per multiply-add, per thread |",
             "|---|---:|", *[f"| {k} | {v:.3f} |" for k, v in dense.items()], "",
             f"Memory bandwidth (a 256 MiB copy, {threads} threads, read + write): {bw / 1e9:.1f} GB/s.", "",
             "## Fractions of the MAC limit each bound allows", "",
             "Loop: the inner loop at its L1 rate (24 KiB), nothing else (no copy, no epilogue, no stall); at its L2 "
             "rate (448 KiB), where a tile's input outgrows L1 (3x3 layers: c_in x (a tile + 2 rows + 2) numbers, "
             "47 KiB or more); aligned: the L2 rate with every read starting on a vector boundary (a layout with "
             "aligned taps, which the kernel does not have); memory: the bytes a call must move (input channels "
             "read, output written) at the copy's bandwidth, which binds where they are not in cache (batch 32; at "
             "batch 1 a network's previous layer leaves them in L2/L3). A target is out of reach where a bound that "
             "applies is below it.", "",
             "| layer | sparsity | batch | target | loop bound (L1) | loop bound (L2) | aligned (L2) | memory bound "
             "| bytes moved |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['sparsity']:.0%} | {r['batch']} | {r['target']:.0%} | {r['loop']:.0%} "
                     f"| {r['loop_l2']:.0%} | {r['aligned_l2']:.0%} | {r['memory']:.0%} "
                     f"| {r['bytes'] / 2**20:.1f} MiB |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    width = vector_bytes()
    loops = loop_rates(width)
    dense = dense_rate(args.threads)
    bw = bandwidth()
    rows = bounds(loops, dense, bw, args.threads)
    write(args.out, loops, dense, bw, rows, args.threads, width, time.time() - start)
    print(open(args.out).read())


if __name__ == "__main__":
    main()
