"""Print the torchvision zoo coverage table: which models ipfx transforms and lowers, and how well.

    python benchmarks/zoo_coverage.py                        # the whole zoo: ~7 min on one core, 14 GB RAM peak
    python benchmarks/zoo_coverage.py --family detection
    python benchmarks/zoo_coverage.py resnet18 raft_small --jsonl zoo.jsonl

The measurements are those of tests/test_zoo.py (check_model): kernel weights rewritten / expected,
partial tracing, transform time, worst relative error of the transformed and of the dense-lowered model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_zoo  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--family", choices=sorted(test_zoo.FAMILIES), action="append")
    parser.add_argument("--fast", action="store_true", help="only the fast subset the tests run by default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jsonl", help="append one JSON record per model to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models or (test_zoo.FAST if args.fast else test_zoo.ALL)
    if args.family:
        names = [n for n in names if test_zoo.spec(n).family in args.family]
    results = []
    header = f"{'model':36s} {'family':14s} {'params':>8s} {'rewritten':>10s} {'partial':>7s} " \
             f"{'transform':>9s} {'err t':>8s} {'err low':>8s}  status"
    print(header, flush=True)
    for name in names:
        r = test_zoo.check_model(name)
        results.append(r)
        gap = test_zoo.KNOWN_GAPS.get(name)
        if r.skipped:
            print(f"{r.name:36s} {r.family:14s} skipped: {r.skipped}", flush=True)
            continue
        status = test_zoo.describe(r) + (f"  (known gap: {', '.join(gap.kinds)})" if gap else "")
        print(f"{r.name:36s} {r.family:14s} {r.params / 1e6:7.1f}M {r.rewritten:4d}/{r.expected:<5d} "
              f"{'yes' if r.partial else 'no':>7s} {r.transform_s:8.1f}s {r.err_transform:8.1e} "
              f"{r.err_lower:8.1e}  {status}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                record = dataclasses.asdict(r)
                record["known_gap"] = list(gap.kinds) if gap else None
                f.write(json.dumps(record) + "\n")
    print()
    print(f"{'family':14s} {'pass':>5s} {'total':>5s}   fully rewritten, outputs preserved, lowering preserved")
    for family in test_zoo.FAMILIES:
        rs = [r for r in results if r.family == family]
        if rs:
            print(f"{family:14s} {sum(not r.kinds for r in rs):5d} {len(rs):5d}")
    if results:
        slow = max(results, key=lambda r: r.transform_s)
        print(f"slowest transform: {slow.name} {slow.transform_s:.1f} s")
    return 0 if all(not r.kinds for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
