"""Fit the cost model of the fused IP convolution's evaluation orders (``ipfx.ops.order``).

    python benchmarks/calibrate.py [--threads 2] [--reps 7] [--out benchmarks/calibration.json]

Times every evaluation order on a fixed set of layer problems (ResNet/MobileNet shapes, 90% and 99%,
IP and SP, batch 1 and 8), computes each problem's work terms with ``ipfx.ops.order.cost_terms``, fits the
per-order constants (non-negative least squares on relative error) and prints them as the
``COST_CONSTANTS`` literal to paste into ``ipfx/ops/order.py``, with the fit's error and how often the
model's pick is within 10% of the fastest order. Run once per machine; times are the minimum of ``--reps``
(other jobs on a shared machine only add time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

from ipfx.ops import native, order as order_mod  # noqa: E402
from ipfx.ops.geometry import _conv_geometry, _output_spatial  # noqa: E402
from ipfx.ops.storage import sparse_coefficients  # noqa: E402

# (name, c_in, c_out, kernel, stride, padding, groups, spatial)
LAYERS = [
    ("3x3 64->64 @56", 64, 64, 3, 1, 1, 1, 56),
    ("3x3 128->128 @28", 128, 128, 3, 1, 1, 1, 28),
    ("3x3 256->256 @14", 256, 256, 3, 1, 1, 1, 14),
    ("3x3 512->512 @7", 512, 512, 3, 1, 1, 1, 7),
    ("3x3 s2 128->128 @56", 128, 128, 3, 2, 1, 1, 56),
    ("3x3 256->16 @14", 256, 16, 3, 1, 1, 1, 14),
    ("1x1 256->64 @56", 256, 64, 1, 1, 0, 1, 56),
    ("1x1 64->256 @56", 64, 256, 1, 1, 0, 1, 56),
    ("1x1 1024->256 @14", 1024, 256, 1, 1, 0, 1, 14),
    ("dw3x3 96 @28", 96, 96, 3, 1, 1, 96, 28),
    ("dw5x5 240 @14", 240, 240, 5, 1, 2, 240, 14),
    ("7x7 s2 3->64 @112", 3, 64, 7, 2, 3, 1, 112),
    ("1x1 240->64 @1 (SE)", 240, 64, 1, 1, 0, 1, 1),  # tiny layers pin down the per-call costs (t0)
    ("3x3 16->16 @8", 16, 16, 3, 1, 1, 1, 8),
]
SPARSITIES = (0.9, 0.99)
BATCHES = (1, 4)


def min_ns(fn, reps: int) -> float:
    """Nanoseconds of ``fn()``: the minimum of ``reps`` calls after two untimed ones (on a shared machine other
    jobs only ever add time)."""
    fn()
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples) * 1e9


def problems():
    gen = torch.Generator().manual_seed(0)
    for name, c_in, c_out, k, s, p, groups, hw in LAYERS:
        K = k * k
        for sparsity in SPARSITIES:
            coeff = torch.randn(c_out, c_in // groups, K, generator=gen)
            coeff = coeff * (torch.rand(coeff.shape, generator=gen) >= sparsity)
            values, indices = sparse_coefficients(coeff)
            for space in ("ip", "sp"):
                if K == 1 and space == "ip":
                    continue
                basis = torch.linalg.qr(torch.randn(K, K, generator=gen))[0] if space == "ip" else None
                for batch in BATCHES:
                    if batch > 1 and hw > 56:
                        continue
                    x = torch.randn(batch, c_in, hw, hw, generator=gen)
                    yield dict(name=name, sparsity=sparsity, space=space, batch=batch), x, values, indices, basis, \
                        dict(weight_shape=[c_out, c_in // groups, k, k], stride=[s, s], padding=[p, p],
                             dilation=[1, 1], groups=groups, transposed=False, output_padding=[0, 0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/calibration.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []  # (label, order, terms, ns)
    with torch.no_grad():
        for label, x, values, indices, basis, geo in problems():
            g = _conv_geometry(x, values, indices, basis, None, **geo)
            out_spatial = _output_spatial(g, x.shape[2:])
            flat = lambda: indices.long()  # noqa: E731
            problem = order_mod._problem(g, x, values, basis, out_spatial)
            terms = order_mod.cost_terms(**problem)
            allowed = order_mod.order_costs(native=native.available(), constants={o: (0,) * len(order_mod.COST_TERMS) for o in order_mod._RUNNERS},
                                            **problem)
            for order, run in order_mod._RUNNERS.items():
                if order not in allowed:
                    continue
                ns = min_ns(lambda: run(g, x, values, indices, flat, basis, out_spatial), args.reps)
                rows.append((label, order, terms[order], ns))
                print(f"{label['name']:22s} {label['sparsity']:.2f} {label['space']} b{label['batch']} "
                      f"order {order}: {ns / 1e3:9.1f} us", flush=True)
    constants = {}
    for order in order_mod._RUNNERS:
        sel = [r for r in rows if r[1] == order]
        if not sel:
            continue
        used = [i for i in range(len(order_mod.COST_TERMS)) if any(r[2][i] for r in sel)]
        A = np.array([[r[2][i] / r[3] for i in used] for r in sel])  # relative error: divide by the time
        coef, _ = nnls(A, np.ones(len(sel)))
        full = [0.0] * len(order_mod.COST_TERMS)
        for i, c in zip(used, coef):
            full[i] = float(c)
        constants[order] = tuple(full)
    # quality: relative error of the prediction, and the regret of the model's choice
    by_problem: dict = {}
    for label, order, terms, ns in rows:
        by_problem.setdefault(json.dumps(label), {})[order] = (terms, ns)
    errors, regrets = [], []
    for key, measured in by_problem.items():
        pred = {o: constants[o][0] + sum(k * t for k, t in zip(constants[o][1:], terms[1:]))
                for o, (terms, _) in measured.items()}
        errors += [abs(pred[o] / measured[o][1] - 1) for o in measured]
        pick = min(sorted(pred), key=pred.get)
        best = min(ns for _, ns in measured.values())
        regrets.append((measured[pick][1] / best, key, pick))
    print("\nCOST_CONSTANTS = {")
    for order, row in constants.items():
        print(f"    {order}: ({', '.join(f'{c:.4g}' for c in row)}),")
    print("}")
    within = sum(r <= 1.10 for r, _, _ in regrets) / len(regrets)
    print(f"median |relative error| of predicted times: {statistics.median(errors):.2f}; "
          f"model pick within 10% of the fastest in {100 * within:.0f}% of {len(regrets)} problems; "
          f"worst pick {max(regrets)[0]:.2f}x the fastest ({max(regrets)[1]}, order {max(regrets)[2]})")
    summary = [
        "# Cost model calibration of the fused op's evaluation orders", "",
        f"Command: `python benchmarks/calibrate.py --threads {args.threads} --reps {args.reps}`, "
        f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; {os.cpu_count()} cores, shared with other jobs "
        "while it ran (times are minima over the repetitions).", "",
        "Fitted constants (ns per unit of each term, `ipfx.ops.order.COST_TERMS`):", "",
        "| order | " + " | ".join(order_mod.COST_TERMS) + " |", "|---|" + "---:|" * len(order_mod.COST_TERMS)]
    for order, row in constants.items():
        summary.append(f"| {order} | " + " | ".join(f"{c:.4g}" for c in row) + " |")
    summary += ["", f"Median relative error of the predicted times: {statistics.median(errors):.2f}. The model's "
                f"pick is within 10% of the fastest order in {100 * within:.0f}% of {len(regrets)} problems; "
                f"the worst pick is {max(regrets)[0]:.2f}x the fastest ({max(regrets)[1]}, order {max(regrets)[2]}).", "",
                "| problem | measured (us) per order | model's pick | pick / fastest |", "|---|---|---|---:|"]
    for r, key, pick in sorted(regrets, reverse=True):
        measured = by_problem[key]
        label = json.loads(key)
        summary.append(f"| {label['name']} {label['sparsity']} {label['space']} b{label['batch']} | "
                       + ", ".join(f"{o}: {ns / 1e3:.0f}" for o, (_, ns) in sorted(measured.items()))
                       + f" | {pick} | {r:.2f}x |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(summary) + "\n")
    with open(args.out, "w") as f:  # one timing per line
        f.write(f'{{"threads": {args.threads}, "torch": {json.dumps(torch.__version__)}, '
                f'"constants": {json.dumps({str(k): v for k, v in constants.items()})},\n "rows": [\n')
        f.write(",\n".join("  " + json.dumps(dict(label=l, order=o, terms=t, ns=n)) for l, o, t, n in rows))
        f.write("\n]}\n")


if __name__ == "__main__":
    main()
