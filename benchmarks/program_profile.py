"""Where a deployed program's time goes, step by step (issue 18's profiles).

    python benchmarks/program_profile.py MODEL.pt2 [--shape 1,3,224,224] [--threads 2] [--calls 200] [--top 25]

Loads ``MODEL.pt2`` with :func:`ipfx.deploy.load_module`, builds its native program on one input of
``--shape``, then runs it ``--calls`` times with step timing on (``Program.set_timing``: each step's wall time,
its kernel and the freeing of values it read last) and prints per step kind, per operator (aten ops, Python
steps) and the slowest steps: microseconds per call and share of the program's time. The gap between the
sum of steps and the whole call is the wrapper (signature, guards, flattening).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import torch  # noqa: E402

import ipfx.deploy  # noqa: E402
from ipfx.ops import program as programs  # noqa: E402


def profile(path: str, shape: tuple, threads: int, calls: int) -> tuple[list, float]:
    """[(node, kind, target, seconds per call)] of the program for one input of ``shape``, and the whole call's
    seconds (median)."""
    torch.set_num_threads(threads)
    m = ipfx.deploy.load_module(path)
    x = torch.randn(*shape)
    with torch.inference_mode():
        m(x)
        kept = programs.programs_of(m)
        program = kept.get(programs._signature([x])) if kept else None
        if program is None:
            raise SystemExit(f"{path}: no native program for this input (the native kernel built? a pytree graph?)")
        for _ in range(5):
            m(x)
        whole = []
        for _ in range(calls):
            start = time.perf_counter()
            m(x)
            whole.append(time.perf_counter() - start)
        program.set_timing(True)
        for _ in range(calls):
            m(x)
        spent = program.step_seconds
        program.set_timing(False)
    targets = {n.name: n for n in m.graph.nodes}
    rows = []
    for name, kind, seconds in zip(program.nodes, program.kinds, spent):
        node = targets.get(name)
        if node is None:  # a layout conversion the program added ("x (to blocked)"), of the value it names
            target = name[name.index("(") + 1:-1] if "(" in name else name
        else:
            target = type(m.get_submodule(node.target)).__name__ if node.op == "call_module" else str(node.target)
        rows.append((name, kind, target, seconds / calls))
    return rows, sorted(whole)[len(whole) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--shape", default="1,3,224,224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rows, whole = profile(args.model, tuple(int(s) for s in args.shape.split(",")), args.threads, args.calls)
    total = sum(r[3] for r in rows)
    print(f"whole call {whole * 1e6:.0f} us (median), steps {total * 1e6:.0f} us (mean), "
          f"wrapper and guards {max(0.0, whole - total) * 1e6:.0f} us; {args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    for title, key in (("kind", lambda r: r[1]), ("operator", lambda r: r[2])):
        sums, counts = collections.Counter(), collections.Counter()
        for r in rows:
            sums[key(r)] += r[3]
            counts[key(r)] += 1
        print(f"\nby {title}:")
        for k, s in sums.most_common():
            print(f"  {k:40s} {counts[k]:4d} steps {s * 1e6:9.1f} us {100 * s / total:5.1f}%")
    print(f"\nslowest {args.top} steps:")
    for name, kind, target, s in sorted(rows, key=lambda r: -r[3])[:args.top]:
        print(f"  {name:40s} {kind:6s} {target:34s} {s * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
