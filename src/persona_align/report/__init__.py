"""Benchmark reports: tables, significance, plots, as Markdown, self-contained HTML and JSON.

``write_report`` turns per-system scored replies (and optionally a training log) into a report
folder; the pipeline's report stage and ``persona-align bench`` both call it. ``run_bench``
loads and scores system files first.
"""

from persona_align.report.bench import DEFAULT_METRICS, load_systems, run_bench, score_systems
from persona_align.report.summary import MetricInfo, build_summary, metric_info
from persona_align.report.writer import write_report

__all__ = [
    "DEFAULT_METRICS",
    "MetricInfo",
    "build_summary",
    "load_systems",
    "metric_info",
    "run_bench",
    "score_systems",
    "write_report",
]
