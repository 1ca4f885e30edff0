"""The cost model's dense-order MAC terms against measured convs (``ipfx.ops.order``: ``dense_grouped``, and
``dense`` with ``--layers ungrouped``), with the constants of orders (a)/(b) in torch.

    python benchmarks/calibrate_grouped.py [--layers grouped|ungrouped] [--threads 1] [--batches 1] [--reps 15]
                                           [--values 0.035,0.07] [--torch-scales 1,2]
                                           [--out benchmarks/calibrate_grouped.md]

Times every order the model allows (dense, native, and orders (a)/(b) in torch where their maps fit the
budget) on grouped convs (mobilenet-like depthwise 3x3 and 5x5, stride 1 and 2; resnext-like groups of 4 to
32 channels) or, with ``--layers ungrouped``, on ungrouped ones (stems with 3 input channels, resnet 3x3 and
1x1 layers, mobilenet's pointwise convs), SP and IP at 50/90/95/99%, at each of ``--batches``, and reports,
for each candidate value of the constant (ns per multiply-accumulate of the dense order) times each factor on
the constants of orders (a)/(b) (the other constants as in ``COST_CONSTANTS``), how often the model's pick
(:func:`ipfx.ops.order.choose_order`) is the fastest order and how much slower its picks are (pick / fastest,
worst and mean), with the least-squares fit of the constant (the dense order's relative error, t0 and io
held). Times are the minimum of ``--reps`` calls.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import torch  # noqa: E402

from ipfx.form.bases import dct_basis  # noqa: E402
from ipfx.ops import native, order as order_mod  # noqa: E402
from ipfx.ops.geometry import _conv_geometry, _output_spatial  # noqa: E402
from ipfx.ops.storage import sparse_coefficients  # noqa: E402
from calibrate import min_ns  # noqa: E402  (benchmarks/calibrate.py, beside this script)

# (input channels, output channels, groups, map size, kernel, stride)
LAYERS = {
    "grouped": [(240, 240, 240, 14, 3, 1), (672, 672, 672, 14, 3, 1), (72, 72, 72, 56, 3, 1), (120, 120, 120, 28, 5, 1),
                (960, 960, 960, 7, 5, 1), (672, 672, 672, 14, 5, 2), (144, 144, 144, 28, 3, 1), (32, 32, 32, 56, 3, 2),
                (128, 128, 32, 56, 3, 1), (256, 256, 32, 28, 3, 1), (512, 512, 32, 14, 3, 1), (1024, 1024, 32, 7, 3, 1),
                (256, 256, 32, 56, 3, 2), (64, 64, 8, 56, 3, 1)],
    "ungrouped": [(3, 16, 1, 224, 3, 2), (3, 32, 1, 224, 3, 2), (3, 64, 1, 224, 7, 2), (16, 16, 1, 112, 3, 1),
                  (16, 32, 1, 112, 3, 1), (32, 32, 1, 56, 3, 1), (64, 64, 1, 56, 3, 1), (128, 128, 1, 28, 3, 1),
                  (256, 256, 1, 14, 3, 1), (512, 512, 1, 7, 3, 1), (128, 128, 1, 56, 3, 2), (256, 64, 1, 56, 1, 1),
                  (64, 256, 1, 56, 1, 1), (1024, 256, 1, 14, 1, 1), (16, 64, 1, 112, 1, 1), (40, 120, 1, 28, 1, 1),
                  (160, 960, 1, 7, 1, 1)],
}
DENSE, NATIVE = order_mod.ORDER_DENSE, order_mod.ORDER_NATIVE
TORCH_ORDERS = (order_mod.ORDER_BASIS_FIRST, order_mod.ORDER_COEFF_FIRST)  # orders (a) and (b) in torch ops
ORDER_NAMES = {order_mod.ORDER_BASIS_FIRST: "a", order_mod.ORDER_COEFF_FIRST: "b", DENSE: "dense", NATIVE: "native"}
TERM = {"grouped": 5, "ungrouped": 4}  # the fitted term's index in COST_TERMS (dense_grouped, dense)


def measure(layers, reps: int, sparsities=(0.5, 0.9, 0.95, 0.99), batches=(1,)) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for (c_in, c, groups, hw, k, stride), batch in itertools.product(layers, batches):
        K = k * k
        for space in ("sp", "ip"):
            for sparsity in sparsities:
                coeff = torch.randn(c, c_in // groups, K, generator=gen)
                coeff = coeff * (torch.rand(coeff.shape, generator=gen) >= sparsity)
                values, indices = sparse_coefficients(coeff)
                basis = dct_basis((k, k), torch.float32) if space == "ip" else None
                x = torch.randn(batch, c_in, hw, hw, generator=gen)
                g = _conv_geometry(x, values, indices, basis, None, [c, c_in // groups, k, k], [stride] * 2,
                                   [k // 2] * 2, [1, 1], groups, False, [0, 0])
                out = _output_spatial(g, x.shape[2:])
                problem = order_mod._problem(g, x, values, basis, out)
                orders = sorted(order_mod.order_costs(native=True, **problem))  # what the model may pick
                flat = lambda: indices.long()  # noqa: E731
                with torch.no_grad():
                    ns = {o: min_ns(lambda: order_mod._RUNNERS[o](g, x, values, indices, flat, basis, out), reps)
                          for o in orders}
                kind = "dw" if groups == c else f"g{groups}" if groups > 1 else f"{c_in}->"
                name = f"{kind} {k}x{k}/{stride} {c}@{hw} {space} {sparsity:.0%}" + (f" b{batch}" if batch > 1 else "")
                rows.append(dict(name=name, problem=problem, terms=order_mod.cost_terms(**problem), ns=ns))
                print(f"{name}: " + ", ".join(f"{ORDER_NAMES[o]} {t / 1e3:.0f} us" for o, t in ns.items()), flush=True)
    return rows


def constants_with(value: float, term: int, torch_scale: float = 1.0) -> dict:
    """``COST_CONSTANTS`` with the dense order's ``term`` at ``value`` and orders (a)/(b) in torch scaled."""
    out = dict(order_mod.COST_CONSTANTS)
    row = list(out[DENSE])
    row[term] = value
    out[DENSE] = tuple(row)
    for o in TORCH_ORDERS:
        out[o] = tuple(torch_scale * c for c in out[o])
    return out


def quality(rows: list[dict], constants: dict) -> tuple[int, float, float, str]:
    """(wrong picks, worst pick / fastest, mean pick / fastest, the worst problem): the model's pick among the
    orders it allows (:func:`ipfx.ops.order.choose_order`, with ``constants``) against the fastest of them"""
    wrong, regrets = 0, []
    for r in rows:
        pick = order_mod.choose_order(native=True, constants=constants, **r["problem"])
        best = min(r["ns"], key=r["ns"].get)
        wrong += pick != best
        regrets.append((r["ns"][pick] / r["ns"][best], r["name"]))
    worst = max(regrets)
    return wrong, worst[0], sum(x for x, _ in regrets) / len(regrets), worst[1]


def fit(rows: list[dict], term: int) -> float:
    """The term's constant minimising the dense order's squared relative error, t0 and io held"""
    c = order_mod.COST_CONSTANTS[DENSE]
    num = den = 0.0
    for r in (r for r in rows if DENSE in r["ns"]):
        ns, t = r["ns"][DENSE], r["terms"][DENSE]
        rest = c[0] + sum(k * v for i, (k, v) in enumerate(zip(c[1:], t[1:]), 1) if i != term)
        num += t[term] / ns * (1 - rest / ns)
        den += (t[term] / ns) ** 2
    return num / den


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", choices=sorted(LAYERS), default="grouped")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--values", default=None, help="candidate constants (default: the current one and a few)")
    parser.add_argument("--torch-scales", default="1",
                        help="factors on the constants of orders (a)/(b) in torch, tried with each value")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "calibrate_grouped.md"))
    args = parser.parse_args(argv)
    if not native.available():
        sys.exit("the native kernel is not available here: nothing to compare the dense order with")
    torch.set_num_threads(args.threads)
    started = time.time()
    term = TERM[args.layers]
    rows = measure(LAYERS[args.layers], args.reps, batches=[int(b) for b in args.batches.split(",")])
    current = order_mod.COST_CONSTANTS[DENSE][term]
    given = args.values or ",".join(str(current * f) for f in (0.5, 1.0, 1.5, 2.0))
    values = [float(v) for v in given.split(",")] + [round(fit(rows, term), 5)]
    name = order_mod.COST_TERMS[term]
    lines = [f"# The {name} term of the cost model against measured {args.layers} convs", "",
             f"Command: `python benchmarks/calibrate_grouped.py --layers {args.layers} --threads {args.threads} "
             f"--batches {args.batches} --reps {args.reps} --values {given} --torch-scales {args.torch_scales} "
             f"--out benchmarks/{os.path.basename(args.out)}`, "
             f"{time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s; torch {torch.__version__}; "
             f"{os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.2f}. "
             f"Current constant: {current}; the last row is the least-squares fit.",
             "", f"| {name} (ns/MAC) | orders (a)/(b) x | wrong picks | worst pick / fastest | mean pick / fastest |",
             "|---:|---:|---:|---|---:|"]
    for v, scale in itertools.product(values, [float(f) for f in args.torch_scales.split(",")]):
        wrong, worst, mean, where = quality(rows, constants_with(v, term, scale))
        lines.append(f"| {v:.4g} | {scale:g} | {wrong}/{len(rows)} | {worst:.2f}x ({where}) | {mean:.3f}x |")
    shown = list(ORDER_NAMES)
    lines += ["", "| problem | " + " | ".join(f"{ORDER_NAMES[o]} (us)" for o in shown) + " |",
              "|---|" + "---:|" * len(shown)]
    lines += [f"| {r['name']} | " + " | ".join(f"{r['ns'][o] / 1e3:.0f}" if o in r["ns"] else "-" for o in shown)
              + " |" for r in rows]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:lines.index("", 4)]))


if __name__ == "__main__":
    main()
