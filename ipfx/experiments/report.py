"""Tables and plots of SP against IP: mean and spread over seeds, per method and sparsity."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path


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


def plot(records, path: str | Path, title: str = "") -> Path:
    """Accuracy against sparsity, one panel per method, SP dashed and IP solid, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    methods = sorted({k[2] for k in groups})
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
