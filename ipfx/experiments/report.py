"""Tables and plots of SP against IP: mean and spread over seeds, per method and sparsity, and the
paired comparison (IP minus SP of the same seed) with confidence intervals."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..atomic import write_atomically

#: Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
       29: 2.045, 30: 2.042}


def _group(records):
    groups = defaultdict(lambda: {"sp": [], "ip": []})
    for r in records:
        groups[(r["model"], r["dataset_name"], r["method"], r["sparsity"])][r["space"]].append(100 * r["accuracy"])
    return dict(sorted(groups.items()))


def _fmt(values) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(records) -> str:
    """One row per (model, data, method, sparsity): SP and IP accuracy (mean ± std over seeds) and the gap."""
    lines = ["| model | data | method | sparsity | SP acc. (%) | IP acc. (%) | gap IP-SP | seeds |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (model, data, method, sparsity), acc in _group(records).items():
        gap = "-"
        if acc["sp"] and acc["ip"]:
            gap = f"{statistics.mean(acc['ip']) - statistics.mean(acc['sp']):+.2f}"
        seeds = max(len(acc["sp"]), len(acc["ip"]))
        lines.append(f"| {model} | {data} | {method} | {sparsity:g} | {_fmt(acc['sp'])} | {_fmt(acc['ip'])} "
                     f"| {gap} | {seeds} |")
    return "\n".join(lines)


#: The smallest accuracy range a plot's axis shows, in points: a closer zoom draws seed noise as a trend.
MIN_SPAN = 20.0


def plot(records, path: str | Path, title: str = "") -> Path:
    """Accuracy against sparsity, one panel per method, SP dashed and IP solid; error bars are one standard
    deviation over the seeds (said on the figure, with the seed count); the accuracy axis spans at least
    :data:`MIN_SPAN` points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    methods = sorted({k[2] for k in groups})
    values = [a for acc in groups.values() for space in acc.values() for a in space]
    seeds = sorted({len(space) for acc in groups.values() for space in acc.values() if space})
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for space, style in (("sp", "--o"), ("ip", "-s")):
            xs, ys, es = [], [], []
            for (_, _, m, sparsity), acc in groups.items():
                if m == method and acc[space]:
                    xs.append(100 * sparsity)
                    ys.append(statistics.mean(acc[space]))
                    es.append(statistics.stdev(acc[space]) if len(acc[space]) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=space.upper())
        ax.set_title(method)
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("test accuracy (%)")
    if values:
        axes[0][0].set_ylim(*accuracy_range(values))
    bars = bars_caption(seeds)
    fig.suptitle(f"{title}\n{bars}" if title else bars, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:  # (whole or not at all: a kill while saving leaves the previous plot, not an empty file)
        write_atomically(path, lambda f: fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def accuracy_range(values) -> tuple[float, float]:
    """The accuracy axis (percent): around the values, at least :data:`MIN_SPAN` points wide plus a margin,
    within [0, 100]."""
    low, high = min(values), max(values)
    span = max(high - low, MIN_SPAN) + 2.0
    bottom = max(0.0, min((low + high - span) / 2, 100.0 - span))
    return bottom, min(100.0, bottom + span)


def bars_caption(seeds) -> str:
    """What a plot's error bars are, given the seed counts of its points."""
    seeds = sorted(set(seeds))
    if not seeds or max(seeds) < 2:
        return "one seed per point: no error bars"
    return f"bars: ±1 standard deviation over {'/'.join(map(str, seeds))} seeds"


def t_interval(values) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t interval of the mean (half-width nan for n < 2)."""
    values = list(values)
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    return mean, T95.get(df, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def paired_gaps(records) -> dict:
    """``{(model, data, method, sparsity): {seed: IP - SP accuracy points}}`` over the seeds that have both."""
    acc = defaultdict(dict)
    for r in records:
        acc[(r["model"], r["dataset_name"], r["method"], r["sparsity"])][(r["seed"], r["space"])] = 100 * r["accuracy"]
    gaps = {}
    for key, runs in sorted(acc.items()):
        seeds = sorted({seed for seed, _ in runs if (seed, "ip") in runs and (seed, "sp") in runs})
        if seeds:
            gaps[key] = {seed: runs[(seed, "ip")] - runs[(seed, "sp")] for seed in seeds}
    return gaps


def paired_tables(records) -> str:
    """The paired comparison as two markdown tables: per setting, the mean IP - SP gap over seeds with its
    95% t-interval; per method, the gap averaged over the sparsities, with the interval taken over the
    seeds (each seed's mean gap is one observation: runs of one seed share their initial weights, so the
    seed, not the run, is the unit that repeats)."""
    gaps = paired_gaps(records)
    if not gaps:
        return ""
    lines = ["| method | sparsity | gap IP-SP (points) | 95% interval | IP ahead | seeds |", "|---|---:|---:|---:|---:|---:|"]
    for (_, _, method, sparsity), by_seed in gaps.items():
        mean, half = t_interval(by_seed.values())
        ahead = sum(g > 0 for g in by_seed.values())
        lines.append(f"| {method} | {sparsity:g} | {mean:+.2f} | {_interval(mean, half)} | {ahead}/{len(by_seed)} "
                     f"| {len(by_seed)} |")
    per_method = defaultdict(lambda: defaultdict(list))
    for (_, _, method, _), by_seed in gaps.items():
        for seed, gap in by_seed.items():
            per_method[method][seed].append(gap)
    lines += ["", "| method | mean gap IP-SP (points) | 95% interval over seeds | IP ahead (runs) | seeds |",
              "|---|---:|---:|---:|---:|"]
    for method, by_seed in sorted(per_method.items()):
        seed_means = [statistics.mean(v) for v in by_seed.values()]
        mean, half = t_interval(seed_means)
        every = [g for v in by_seed.values() for g in v]
        lines.append(f"| {method} | {mean:+.2f} | {_interval(mean, half)} | "
                     f"{sum(g > 0 for g in every)}/{len(every)} | {len(by_seed)} |")
    return "\n".join(lines)


def _interval(mean: float, half: float) -> str:
    return "-" if math.isnan(half) else f"[{mean - half:+.2f}, {mean + half:+.2f}]"
