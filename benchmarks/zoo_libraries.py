"""Check the library zoo catalogue (tests/zoo_libraries.py) against torch.export and torch.fx, without ipfx.

    python benchmarks/zoo_libraries.py                       # every entry: ~10 min on one core
    python benchmarks/zoo_libraries.py --fast                # the subset the tests run by default
    python benchmarks/zoo_libraries.py --family timm --jsonl zoo_libraries.jsonl
    python benchmarks/zoo_libraries.py transformers/vit timm/dm_nfnet_f0

For each entry, prepared as the tests prepare it (constant parameters redrawn, batch norms calibrated, see
tests/test_zoo.py), it measures:

* eval / train: ``torch.export.export(model, args, kwargs, strict=False)`` with the model in that mode (the
  export time), and whether ``ep.module()(*args, **kwargs)`` equals ``model(*args, **kwargs)``: every tensor
  of the output, relative to its largest magnitude, within 1e-4 (the RNG seeded the same before each call);
  in training mode it first checks that the output does not depend on the seed (no dropout left on);
* sensitivity: how much the training-mode output changes (relative) when every weight changes by float32
  rounding (1e-7, relative): training-mode batch norm over tiny feature maps can amplify rounding so much
  that no comparison at 1e-4 is meaningful; entries above 3e-5 are flagged;
* fx: whether ``torch.fx.symbolic_trace(model)`` traces the model (in eval mode) and the trace computes the
  same outputs ("ok"), traces but computes something else or fails when called ("wrong"/"call"), or does
  not trace ("fails").

This is what ipfx's torch.export front end (issue 10) builds on: an entry that exports in both modes with
equal outputs is one that ``ipfx.transform(model, example_inputs=...)`` can capture as a whole.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import gc
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_zoo  # noqa: E402
import zoo_libraries  # noqa: E402


@dataclasses.dataclass
class Check:
    id: str
    family: str
    params: int = 0
    build_s: float = 0.0
    forward_s: float = 0.0  # one eval-mode forward
    export_s: dict = dataclasses.field(default_factory=dict)  # "eval"/"train" -> seconds
    status: dict = dataclasses.field(default_factory=dict)  # "eval"/"train"/"fx" -> "ok" or what went wrong
    error: float = float("nan")  # worst relative error of the exported modules
    fx_error: str = ""  # why symbolic tracing failed (the first line of the exception)
    sensitivity: float = float("nan")  # training-mode output change under 1e-7 relative weight noise

    @property
    def exports(self) -> bool:
        return self.status.get("eval") == "ok" and self.status.get("train") == "ok"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


def prepare(entry: zoo_libraries.Entry):
    """Build ``entry`` as the tests do: seeded, constant parameters redrawn, batch norms calibrated."""
    torch.manual_seed(0)
    model, args, kwargs = entry.build()
    test_zoo.randomize_constant_parameters(model)
    test_zoo.calibrate_batch_norm(model, args, kwargs)
    return model, args, kwargs


def _call(fn, args, kwargs, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(*args, **kwargs)


SENSITIVE = 3e-5


def sensitivity(model, args, kwargs, reference) -> float:
    """Worst relative change of the outputs when every weight is scaled by ``1 + 1e-7 * N(0, 1)``."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g).to(p.dtype))
    worst, _ = test_zoo.compare(_call(noisy, args, kwargs), reference, "zoo libraries: sensitivity")
    return worst


def check(entry: zoo_libraries.Entry) -> Check:
    c = Check(entry.id, entry.family)
    try:
        t0 = time.perf_counter()
        model, args, kwargs = prepare(entry)
        c.build_s = time.perf_counter() - t0
        c.params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        reference = {"eval": _call(model, args, kwargs)}
        c.forward_s = time.perf_counter() - t0
    except zoo_libraries.Unavailable as exc:
        c.status["build"] = f"unavailable: {exc}"
        return c
    except Exception as exc:  # noqa: BLE001 - reported in the table
        c.status["build"] = _first_line(exc)
        return c
    worst = 0.0
    try:
        c.status["fx"] = "fails"
        gm = torch.fx.symbolic_trace(model)
        c.status["fx"] = "call"
        _, bad = test_zoo.compare(_call(gm, args, kwargs), reference["eval"], "zoo libraries: fx")
        c.status["fx"] = "wrong" if bad else "ok"
        c.fx_error = "; ".join(bad[:2])
    except Exception as exc:  # noqa: BLE001 - recorded as the fx status
        c.fx_error = _first_line(exc)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        try:
            if mode == "train":
                reference[mode] = _call(model, args, kwargs)
                _, bad = test_zoo.compare(_call(model, args, kwargs, seed=2), reference[mode], "zoo libraries: seeds")
                if bad:  # some dropout-like randomness is left on: the comparison would be meaningless
                    raise AssertionError(f"training mode depends on the seed: {bad[0]}")
                c.sensitivity = sensitivity(model, args, kwargs, reference[mode])
                if c.sensitivity > SENSITIVE:
                    raise AssertionError(f"ill-conditioned in training mode: {c.sensitivity:.1e}")
            t0 = time.perf_counter()
            ep = torch.export.export(model, args, kwargs, strict=False)
            c.export_s[mode] = time.perf_counter() - t0
            rel, bad = test_zoo.compare(_call(ep.module(), args, kwargs), reference[mode], f"zoo libraries: export {mode}")
            worst = max(worst, rel)
            c.status[mode] = "; ".join(bad[:2]) if bad else "ok"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            c.status[mode] = _first_line(exc)
    c.error = worst
    return c


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="*", help="entry ids (family/name) or names (default: all)")
    parser.add_argument("--family", choices=zoo_libraries.FAMILIES, action="append")
    parser.add_argument("--fast", action="store_true", help="only the subset the tests run by default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jsonl", help="append one JSON record per entry to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    zoo_libraries.offline()
    entries = [zoo_libraries.BY_ID[i] for i in zoo_libraries.FAST] if args.fast else zoo_libraries.ALL
    if args.entries:
        entries = [e for e in entries if e.id in args.entries or e.name in args.entries]
    if args.family:
        entries = [e for e in entries if e.family in args.family]
    print(f"{'entry':44s} {'params':>7s} {'build':>6s} {'export eval':>11s} {'export train':>12s} {'err':>8s} "
          f"{'sens':>8s} {'fx':>6s}  status", flush=True)
    checks = []
    for entry in entries:
        c = check(entry)
        checks.append(c)
        gc.collect()
        problems = {k: v for k, v in c.status.items() if k != "fx" and v != "ok"}
        status = "ok" if not problems else "; ".join(f"[{k}] {v}" for k, v in problems.items())
        times = [f"{c.export_s[m]:.2f}s" if m in c.export_s else "-" for m in ("eval", "train")]
        print(f"{c.id:44s} {c.params / 1e6:6.1f}M {c.build_s:5.2f}s {times[0]:>11s} {times[1]:>12s} "
              f"{c.error:8.1e} {c.sensitivity:8.1e} {c.status.get('fx', '-'):>6s}  {status}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(dataclasses.asdict(c)) + "\n")
    print()
    print(f"{'family':14s} {'exports':>8s} {'total':>5s} {'fx ok':>6s} {'export s (median / max, per mode)':>34s}")
    by_family = collections.defaultdict(list)
    for c in checks:
        by_family[c.family].append(c)
    for family, cs in by_family.items():
        times = sorted(t for c in cs for t in c.export_s.values())
        spread = f"{times[len(times) // 2]:.2f} / {times[-1]:.2f}" if times else "-"
        print(f"{family:14s} {sum(c.exports for c in cs):8d} {len(cs):5d} "
              f"{sum(c.status.get('fx') == 'ok' for c in cs):6d} {spread:>34s}")
    print(f"{'all':14s} {sum(c.exports for c in checks):8d} {len(checks):5d} "
          f"{sum(c.status.get('fx') == 'ok' for c in checks):6d}")
    return 0 if all(c.exports for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
