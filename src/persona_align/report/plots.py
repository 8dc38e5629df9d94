"""The report's figures, rendered off-screen (matplotlib Agg) to PNG bytes.

Each function returns the PNG, or None when the data cannot make that figure (then the report
says why instead of showing an empty plot).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from persona_align.records import ScoredCandidate

DPI = 100
DISCRETE_MAX = 5  # a metric with at most this many distinct values is shown as value shares


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    _plt().close(fig)
    return buffer.getvalue()


def _colors(count: int) -> list[Any]:
    cmap = _plt().get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def _grid(panels: int, columns: int, width: float, height: float) -> tuple[Any, list[Any]]:
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    fig, axes = _plt().subplots(
        rows, columns, figsize=(width * columns, height * rows), squeeze=False
    )
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.axis("off")
    return fig, flat[:panels]


def _metric_cells(summary: Mapping[str, Any], metric: str) -> list[dict[str, Any] | None]:
    return [entry["metrics"].get(metric) for entry in summary["systems"].values()]


def metric_bars(summary: Mapping[str, Any], metrics: Sequence[str]) -> bytes | None:
    """One panel per metric (and the failure ratio): bar per system, bootstrap 95% interval."""
    systems = list(summary["systems"])
    panels: list[tuple[str, list[float], list[tuple[float, float]]]] = []
    for metric in metrics:
        cells = _metric_cells(summary, metric)
        if any(cells):
            panels.append(
                (
                    metric,
                    [c["mean"] if c else math.nan for c in cells],
                    [tuple(c["ci95"]) if c else (math.nan, math.nan) for c in cells],
                )
            )
    entries = list(summary["systems"].values())
    panels.append(
        (
            "failure ratio (lower is better)",
            [e["failure_ratio"] for e in entries],
            [tuple(e["failure_ci95"]) for e in entries],
        )
    )
    colors = _colors(len(systems))
    fig, axes = _grid(len(panels), 3, 4.4, 3.6)
    x = np.arange(len(systems))
    for ax, (title, means, cis) in zip(axes, panels, strict=True):
        mean = np.asarray(means, float)
        low = np.asarray([c[0] for c in cis], float)
        high = np.asarray([c[1] for c in cis], float)
        errors = np.vstack([np.clip(mean - low, 0, None), np.clip(high - mean, 0, None)])
        ax.bar(x, np.nan_to_num(mean), color=colors, yerr=np.nan_to_num(errors), capsize=3)
        ax.set_title(title)
        ax.set_xticks(x, systems, rotation=40, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean per system with bootstrap 95% interval")
    fig.tight_layout()
    return _png(fig)


def radar(summary: Mapping[str, Any], metrics: Sequence[str]) -> bytes | None:
    """Metric means min-max normalised across systems (1 = best system on that metric)."""
    usable = [m for m in metrics if all(_metric_cells(summary, m))]
    if len(usable) < 3:
        return None
    systems = list(summary["systems"])
    better = {m: summary["metrics"][m]["higher_is_better"] for m in usable}
    columns = []
    for metric in usable:
        means = np.asarray([c["mean"] for c in _metric_cells(summary, metric)], float)
        span = means.max() - means.min()
        scaled = (means - means.min()) / span if span > 0 else np.full_like(means, 0.5)
        columns.append(scaled if better[metric] else 1 - scaled)
    values = np.vstack(columns).T  # rows: systems, columns: metrics
    angles = np.linspace(0, 2 * np.pi, len(usable), endpoint=False)
    closed = np.concatenate([angles, angles[:1]])
    plt = _plt()
    fig = plt.figure(figsize=(7, 6.2))
    ax = fig.add_subplot(projection="polar")
    for row, name, color in zip(values, systems, _colors(len(systems)), strict=True):
        ring = np.concatenate([row, row[:1]])
        ax.plot(closed, ring, color=color, linewidth=1.5, label=name)
        ax.fill(closed, ring, color=color, alpha=0.08)
    ax.set_xticks(angles, usable)
    ax.set_ylim(0, 1)
    ax.set_rorigin(-0.15)  # a system at 0 everywhere stays a visible ring, not a point
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_title("metric means, min-max normalised across systems (1 = best)", pad=18)
    ax.legend(loc="upper left", bbox_to_anchor=(1.05, 1.0), fontsize=8)
    fig.tight_layout()
    return _png(fig)


def distributions(
    systems: Mapping[str, Sequence[ScoredCandidate]], metrics: Sequence[str]
) -> bytes | None:
    """Values of valid replies: value shares for discrete metrics (C, UE), box plots for others."""
    names = list(systems)
    panels = []
    for metric in metrics:
        per = [
            np.asarray(
                [
                    c.scores[metric]
                    for c in systems[s]
                    if c.valid and c.scores.get(metric) is not None
                ],
                float,
            )
            for s in names
        ]
        if any(v.size for v in per):
            panels.append((metric, per))
    if not panels:
        return None
    fig, axes = _grid(len(panels), 3, 4.4, 3.6)
    x = np.arange(len(names))
    for ax, (metric, per) in zip(axes, panels, strict=True):
        distinct = np.unique(np.concatenate(per))
        if distinct.size <= DISCRETE_MAX:
            bottom = np.zeros(len(names))
            for value, color in zip(distinct, _colors(distinct.size), strict=True):
                share = np.asarray([(v == value).mean() if v.size else 0.0 for v in per])
                ax.bar(x, share, bottom=bottom, color=color, label=f"{value:g}")
                bottom += share
            ax.set_ylabel("share of valid replies")
            ax.legend(fontsize=7, title="value", title_fontsize=7, loc="upper right")
        else:
            ax.boxplot([v if v.size else [math.nan] for v in per], positions=x, showmeans=True)
        ax.set_title(metric)
        ax.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("score distributions over valid replies")
    fig.tight_layout()
    return _png(fig)


def failure_vs_latency(summary: Mapping[str, Any]) -> bytes | None:
    """PersoDPO Fig. 2c: failure ratio against mean response time, one point per system."""
    points = [
        (name, e["mean_latency_s"], e["failure_ratio"])
        for name, e in summary["systems"].items()
        if e["mean_latency_s"] is not None
    ]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for (name, latency, failure), color in zip(points, _colors(len(points)), strict=True):
        ax.scatter([latency], [failure], color=color, s=60, zorder=3, label=name)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # labels never overlap
    ax.set_xlabel("mean response time (s)")
    ax.set_ylabel("failure ratio")
    ax.set_xlim(0, max(p[1] for p in points) * 1.1 or 1.0)
    ax.set_ylim(0, max(max(p[2] for p in points) * 1.15, 0.05))
    ax.grid(alpha=0.3)
    ax.set_title("failure ratio vs mean response time")
    fig.tight_layout()
    return _png(fig)


def baseline_differences(summary: Mapping[str, Any]) -> bytes | None:
    """Per metric: system minus baseline with its paired bootstrap 95% interval (0 = no change)."""
    block = summary.get("baseline")
    if not block or not block["comparisons"]:
        return None
    comparisons = block["comparisons"]
    systems = list(comparisons)
    keys = [k for k in next(iter(comparisons.values())) if any(comparisons[s][k] for s in systems)]
    fig, axes = _grid(len(keys), 3, 4.4, 0.45 * len(systems) + 1.6)
    y = np.arange(len(systems))
    for ax, key in zip(axes, keys, strict=True):
        for i, (system, color) in enumerate(zip(systems, _colors(len(systems)), strict=True)):
            cell = comparisons[system][key]
            if cell is None:
                continue
            ax.errorbar(
                cell["mean_diff"],
                i,
                xerr=[
                    [cell["mean_diff"] - cell["ci95_low"]],
                    [cell["ci95_high"] - cell["mean_diff"]],
                ],
                fmt="o",
                color=color,
                capsize=3,
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, systems, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(key.replace("_", " "))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"difference to {block['name']} (paired bootstrap 95% interval)")
    fig.tight_layout()
    return _png(fig)


def training_curves(log: Sequence[Mapping[str, Any]]) -> tuple[bytes | None, list[str]]:
    """The trainer's curves (loss, grad norm, reward margin and accuracy, log-probs) present."""
    from persona_align.training.curves import plot_training_curves

    buffer = io.BytesIO()
    keys = plot_training_curves([dict(e) for e in log], buffer)
    return (buffer.getvalue() if keys else None), keys
