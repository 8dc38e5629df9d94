"""The numbers of a benchmark report, as one JSON-ready dict.

Per system: mean ± population std and bootstrap 95% interval of every metric (from
:func:`persona_align.metrics.aggregate.summarize`), failure ratio with its own interval, mean
response time, and the call errors (no reply came back), which are left out of all of these.
Across systems: a PersoBench-style ranking and, against a named baseline, paired differences
with bootstrap intervals and randomization p-values
(:func:`persona_align.metrics.aggregate.paired_test`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from persona_align.errors import InputError
from persona_align.metrics.aggregate import bootstrap_ci, paired_test, summarize
from persona_align.records import Candidate, ScoredCandidate

FAILURE = "failure_ratio"


@dataclass
class MetricInfo:
    """What the report says about one metric besides its values."""

    name: str
    available: bool = True
    reason: str | None = None
    model: str | None = None
    higher_is_better: bool = True
    description: str = ""
    settings: dict[str, Any] | None = None


def metric_info(name: str, status: Any | None = None) -> MetricInfo:
    """Direction and description from the metric registry; availability and settings from a
    MetricStatus."""
    from persona_align.metrics import METRICS

    cls = METRICS.get(name)
    info = MetricInfo(
        name,
        higher_is_better=getattr(cls, "higher_is_better", True),
        description=getattr(cls, "description", ""),
    )
    if status is not None:
        info.available, info.reason, info.model = status.available, status.reason, status.model
        info.settings = status.settings
    return info


def _clean(value: Any) -> Any:
    """NaN/inf become None and tuples lists, so summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def rank_average(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """Rank 1 = best; tied values share the mean of the ranks they span."""
    data = np.asarray(values, float) * (-1.0 if higher_is_better else 1.0)
    order = np.argsort(data, kind="stable")
    ranks = np.empty(len(data))
    start = 0
    while start < len(data):
        end = start
        while end + 1 < len(data) and data[order[end + 1]] == data[order[start]]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return [float(r) for r in ranks]


def ranking(
    systems: Mapping[str, Mapping[str, Any]], infos: Sequence[MetricInfo]
) -> dict[str, Any]:
    """PersoBench-style ranking: rank the systems on each criterion, order by mean rank.

    Criteria are the metrics with a mean for every system, plus the failure ratio (lower is
    better). Response time is left out: it measures the hardware as much as the model.
    """
    names = list(systems)
    criteria: list[tuple[str, list[float], bool]] = []
    skipped = []
    for info in infos:
        cells = [systems[s]["metrics"].get(info.name) for s in names]
        if all(cells):
            criteria.append((info.name, [c["mean"] for c in cells], info.higher_is_better))
        else:
            skipped.append(info.name)
    criteria.append((FAILURE, [systems[s][FAILURE] for s in names], False))
    ranks = {name: rank_average(values, better) for name, values, better in criteria}
    rows = []
    for i, system in enumerate(names):
        per = {name: ranks[name][i] for name, _, _ in criteria}
        rows.append(
            {"system": system, "mean_rank": float(np.mean(list(per.values()))), "ranks": per}
        )
    rows.sort(key=lambda row: (row["mean_rank"], row["system"]))
    for position, row in enumerate(rows, start=1):
        row["position"] = position
    return {"criteria": [name for name, _, _ in criteria], "skipped": skipped, "order": rows}


def _per_dialogue(records: Sequence[ScoredCandidate], key: str) -> dict[str, float]:
    """One value per dialogue (the mean when a system answered a dialogue more than once)."""
    sums: dict[str, list[float]] = {}
    for c in records:
        if c.error is not None:  # no reply came back: nothing of the model's to compare
            continue
        value = float(not c.valid) if key == FAILURE else c.scores.get(key)
        if value is not None:
            sums.setdefault(c.dialogue_id, []).append(float(value))
    return {k: v[0] if len(v) == 1 else sum(v) / len(v) for k, v in sums.items()}


def compare_to_baseline(
    systems: Mapping[str, Sequence[ScoredCandidate]],
    metrics: Sequence[str],
    baseline: str,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float] | None]]:
    """System minus baseline per metric (and failure ratio) on the dialogues both answered."""
    if baseline not in systems:
        raise InputError(
            None, f"--baseline {baseline!r} is not a system; systems: {', '.join(systems)}"
        )
    keys = [*metrics, FAILURE]
    reference = {key: _per_dialogue(systems[baseline], key) for key in keys}
    out: dict[str, dict[str, dict[str, float] | None]] = {}
    for name, records in systems.items():
        if name == baseline:
            continue
        out[name] = {}
        for key in keys:
            a, b = _per_dialogue(records, key), reference[key]
            out[name][key] = paired_test(a, b, seed=seed) if set(a) & set(b) else None
    return out


def check_answered(system: str, records: Sequence[Candidate]) -> None:
    """Refuse a system none of whose calls came back: it has no reply to report on."""
    if all(r.error is not None for r in records):
        raise InputError(
            None, f"system {system!r}: all {len(records)} of its calls failed (every candidate "
            "holds an error); rerun generate to retry them",
        )  # fmt: skip


def build_summary(
    systems: Mapping[str, Sequence[ScoredCandidate]],
    infos: Sequence[MetricInfo],
    baseline: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the tables and plots show, keyed by system name (in the given order)."""
    if not systems:
        raise InputError(None, "no systems to report on")
    names = [info.name for info in infos]
    table: dict[str, Any] = {}
    for system, records in systems.items():
        if not records:
            raise InputError(None, f"system {system!r} has no replies")
        check_answered(system, records)
        answered = [r for r in records if r.error is None]
        relabelled = [r.model_copy(update={"responder": system}) for r in records]
        entry = summarize(relabelled, names, n_boot=n_boot, seed=seed)[system]
        failures = [float(not r.valid) for r in answered]
        entry["failure_ci95"] = bootstrap_ci(failures, n_boot, seed)
        entry["dialogues"] = len({r.dialogue_id for r in records})
        table[system] = entry
    summary: dict[str, Any] = {
        "metrics": {
            i.name: {
                "available": i.available,
                "reason": i.reason,
                "model": i.model,
                "higher_is_better": i.higher_is_better,
                "description": i.description,
                "settings": i.settings,
            }
            for i in infos
        },
        "systems": table,
        "ranking": ranking(table, infos),
        "baseline": None,
    }
    if baseline is not None:
        summary["baseline"] = {
            "name": baseline,
            "comparisons": compare_to_baseline(systems, names, baseline, seed),
        }
    return _clean(summary)
