"""Write a benchmark report folder: report.md, report.html, summary.json and plots/*.png.

Everything is computed and rendered in memory first, then each file is written atomically, so
a failure while computing leaves the folder as it was, and no file is ever half-written. Other
files already in the folder are left alone (the folder may be a pipeline's run folder).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_align.records import ScoredCandidate, atomic_open
from persona_align.report import plots
from persona_align.report.render import PLOTS, sections, to_html, to_markdown
from persona_align.report.summary import MetricInfo, build_summary, metric_info


def _metric_names(systems: Mapping[str, Sequence[ScoredCandidate]]) -> list[str]:
    names: dict[str, None] = {}
    for records in systems.values():
        for record in records:
            names.update(dict.fromkeys(record.scores))
    return list(names)


def write_report(
    out_dir: str | Path,
    systems: Mapping[str, Sequence[ScoredCandidate]],
    metrics: Sequence[MetricInfo | str] | None = None,
    training_log: Sequence[Mapping[str, Any]] | None = None,
    baseline: str | None = None,
    title: str = "persona-align benchmark report",
    n_boot: int = 1000,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Report on scored systems (name → its scored replies); returns what summary.json holds.

    ``metrics`` are MetricInfo (availability from scoring) or names (all of them available);
    by default every score key found. ``training_log`` is the trainer's log (one dict per
    logged step, TRL's keys); ``extra`` entries are copied into summary.json as they are.
    """
    began = time.perf_counter()
    infos = [
        m if isinstance(m, MetricInfo) else metric_info(m)
        for m in (metrics if metrics is not None else _metric_names(systems))
    ]
    summary = build_summary(systems, infos, baseline=baseline, n_boot=n_boot, seed=seed)
    names = [i.name for i in infos]
    summary = {
        "title": title,
        "dialogues": len({r.dialogue_id for records in systems.values() for r in records}),
        "n_boot": n_boot,
        "seed": seed,
        **summary,
        "training": None,
    }
    timings = {"statistics": time.perf_counter() - began}

    began = time.perf_counter()
    images: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    drawn = {
        "bars": plots.metric_bars(summary, names),
        "radar": plots.radar(summary, names),
        "distributions": plots.distributions(systems, names),
        "failure_latency": plots.failure_vs_latency(summary),
    }
    reasons = {
        "radar": "it needs at least 3 metrics with a value for every system",
        "distributions": "no valid reply has a metric value",
        "failure_latency": "no system has response times",
    }
    if baseline is not None:
        drawn["baseline"] = plots.baseline_differences(summary)
        reasons["baseline"] = "no system shares a dialogue with the baseline"
    if training_log is not None:
        png, keys = plots.training_curves(training_log)
        drawn["training"] = png
        reasons["training"] = "the training log has no loss, grad_norm, reward or log-prob values"
        summary["training"] = {"steps": len(training_log), "curves": keys}
    for key, png in drawn.items():
        if png is not None:
            images[key] = png
        else:
            missing[key] = reasons[key]
    timings["plots"] = time.perf_counter() - began
    summary["plots"] = {key: f"plots/{key}.png" for key in images}
    summary["plots_missing"] = missing
    summary.update(extra or {})
    summary.setdefault("timings_s", {}).update(timings)

    parts = sections(summary, images, missing)
    markdown = to_markdown(parts, summary["plots"])
    page = to_html(parts, images)
    text = json.dumps(summary, ensure_ascii=False, indent=2, allow_nan=False)

    out = Path(out_dir)
    for key, png in images.items():
        with atomic_open(out / "plots" / f"{key}.png", "wb") as handle:
            handle.write(png)
    for key in PLOTS.keys() - images.keys():  # a figure this run could not draw is not kept
        (out / "plots" / f"{key}.png").unlink(missing_ok=True)
    for name, content in (("report.md", markdown), ("report.html", page), ("summary.json", text)):
        with atomic_open(out / name) as handle:
            handle.write(content if content.endswith("\n") else content + "\n")
    return summary
