"""``persona-align bench``: score several systems on the same dialogues, then write the report.

A system is one file: Candidate records (``persona-align generate``), a responses CSV
row-aligned with the dialogues, or ScoredCandidate records (their values are kept; only metrics
they lack are computed). Its name is its responder's (a file of several responders is several
systems), the stem of a CSV, or ``NAME`` in ``NAME=FILE``. Every system must answer every
dialogue exactly once, so all are compared on the same dialogues.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona_align.data import read_dialogues
from persona_align.data.responses import Extraction, import_responses
from persona_align.data.stats import detect_type
from persona_align.errors import InputError
from persona_align.files import check_output_folder
from persona_align.records import (
    Candidate,
    Dialogue,
    ScoredCandidate,
    read_records,
    write_records,
)
from persona_align.report.summary import MetricInfo, check_answered, metric_info
from persona_align.report.writer import write_report

DEFAULT_METRICS = ("c", "ue", "p", "lfc", "dist-1", "dist-2", "bleu-1", "rouge-l")
Kind = Literal["candidates", "responses", "scored"]


@dataclass
class System:
    name: str
    path: Path
    kind: Kind
    records: list[Candidate] = field(default_factory=list)


def parse_system(arg: str) -> tuple[str | None, Path]:
    """``NAME=FILE`` or ``FILE`` (a file whose own name holds ``=`` is taken as a file)."""
    name, sep, rest = arg.partition("=")
    if sep and name.strip() and rest and not Path(arg).exists():
        return name.strip(), Path(rest)
    return None, Path(arg)


def _read_system_file(path: Path) -> tuple[Kind, list[Candidate]]:
    try:
        kind = detect_type(path)
    except InputError as err:
        if "cannot tell" not in err.message:
            raise
        raise InputError(
            path, "neither Candidate nor ScoredCandidate records (no responder or scores key)",
            where="line 1",
        ) from None  # fmt: skip
    if kind == "scored":
        return "scored", list(read_records(path, ScoredCandidate))
    if kind == "candidate":
        return "candidates", read_records(path, Candidate)
    raise InputError(
        path, f"holds {kind} records; a system is Candidate or ScoredCandidate records or a "
        "responses CSV",
    )  # fmt: skip


def _check_coverage(
    path: Path, records: Sequence[Candidate], dialogues: Sequence[Dialogue]
) -> dict[str, list[Candidate]]:
    """Group by responder; each must answer every dialogue exactly once."""
    known = {d.id for d in dialogues}
    groups: dict[str, dict[str, Candidate]] = {}
    for index, record in enumerate(records, start=1):
        where = f"record {index}"
        if record.dialogue_id not in known:
            raise InputError(
                path, f"no dialogue with id {record.dialogue_id!r} in the dialogues file",
                where=where, field="dialogue_id",
            )  # fmt: skip
        seen = groups.setdefault(record.responder, {})
        if record.dialogue_id in seen:
            raise InputError(
                path, f"second reply of {record.responder!r} to dialogue {record.dialogue_id!r}",
                where=where, field="dialogue_id",
            )  # fmt: skip
        seen[record.dialogue_id] = record
    for responder, seen in groups.items():
        missing = [d.id for d in dialogues if d.id not in seen]
        if missing:
            raise InputError(
                path,
                f"{responder!r} answers {len(seen)} of {len(dialogues)} dialogues (first without "
                f"a reply: {missing[0]!r}); every system must answer every dialogue",
            )
    return {name: [seen[d.id] for d in dialogues] for name, seen in groups.items()}


def load_systems(
    args: Sequence[str], dialogues: Sequence[Dialogue], extraction: Extraction = "lenient"
) -> list[System]:
    """The systems named on the command line, in order, each aligned with ``dialogues``."""
    if not args:
        raise InputError(None, "no systems: give --systems FILE... (or NAME=FILE)")
    systems: list[System] = []
    for arg in args:
        name, path = parse_system(arg)
        if not path.exists():
            raise InputError(path, "file does not exist")
        if path.is_dir():
            raise InputError(path, "is a directory, expected a system file")
        if path.suffix.lower() == ".csv":
            candidates = import_responses(path, list(dialogues), name, extraction)
            kind: Kind = "responses"
            groups = {name or path.stem: candidates}
        else:
            kind, records = _read_system_file(path)
            groups = _check_coverage(path, records, dialogues)
            if name is not None:
                if len(groups) > 1:
                    raise InputError(
                        path,
                        f"holds {len(groups)} responders ({', '.join(groups)}); "
                        "NAME=FILE can only name a file with one responder",
                    )
                groups = {name: next(iter(groups.values()))}
        for system_name, records in groups.items():
            if any(s.name == system_name for s in systems):
                raise InputError(
                    path, f"a second system named {system_name!r}; name one with NAME=FILE"
                )
            systems.append(System(system_name, path, kind, list(records)))
    return systems


def _needs(system: System, metric: str) -> bool:
    if system.kind != "scored":
        return True
    return any(metric not in r.scores for r in system.records)  # type: ignore[attr-defined]


def _candidate(record: Candidate) -> Candidate:
    """The Candidate part of a record (a ScoredCandidate's scores are not the scorer's input)."""
    if type(record) is Candidate:
        return record
    return Candidate(**record.model_dump(include=set(Candidate.model_fields)))


def score_systems(
    systems: Sequence[System],
    dialogues: Sequence[Dialogue],
    metrics: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cache_path: Path | None = None,
    console: Console | None = None,
) -> tuple[dict[str, list[ScoredCandidate]], list[MetricInfo], dict[str, float]]:
    """Score every system with every metric it lacks; per-metric load and scoring seconds.

    One metric at a time over all systems, so each metric's time is measured on its own.
    """
    from persona_align.metrics import make_metric
    from persona_align.metrics.scorer import MetricStatus, ScoreCache, prepare_metrics, score_stream

    options = options or {}
    instances = [make_metric(m, **dict(options.get(m, {}))) for m in metrics]
    by_id = {d.id: d for d in dialogues}
    values: dict[str, list[dict[str, float | None]]] = {
        s.name: [dict(getattr(r, "scores", {})) for r in s.records] for s in systems
    }
    plain = {s.name: [_candidate(r) for r in s.records] for s in systems}
    infos: list[MetricInfo] = []
    timings: dict[str, float] = {}
    cache = ScoreCache(cache_path) if cache_path is not None else None
    todo = sum(len(s.records) for m in metrics for s in systems if _needs(s, m))
    try:
        with Progress(
            TextColumn("[bold]scoring {task.fields[metric]}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, disable=console is None,
        ) as progress:  # fmt: skip
            task = progress.add_task("score", total=todo, metric="")
            for metric in instances:
                users = [s for s in systems if _needs(s, metric.name)]
                if not users:  # every system brought its own values
                    infos.append(metric_info(metric.name, MetricStatus(metric.name, metric.model)))
                    continue
                began = time.perf_counter()
                (status,) = prepare_metrics([metric], dialogues)
                timings[f"load {metric.name}"] = time.perf_counter() - began
                infos.append(metric_info(metric.name, status))
                progress.update(task, metric=metric.name)
                began = time.perf_counter()
                for system in users:
                    stream = score_stream(
                        by_id, plain[system.name], [metric], [status], cache, source=system.path
                    )
                    for row, scored in zip(values[system.name], stream, strict=True):
                        row.setdefault(metric.name, scored.scores[metric.name])
                        progress.advance(task)
                timings[f"score {metric.name}"] = time.perf_counter() - began
    finally:
        if cache is not None:
            cache.close()
    scored = {
        s.name: [
            ScoredCandidate(**c.model_dump(), scores=row, total=getattr(r, "total", None))
            for r, c, row in zip(s.records, plain[s.name], values[s.name], strict=True)
        ]
        for s in systems
    }
    return scored, infos, timings


def safe_name(name: str) -> str:
    """A system name as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "system"


def run_bench(
    dialogues_path: Path,
    system_args: Sequence[str],
    out_dir: Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cache_path: Path | None = None,
    baseline: str | None = None,
    training_log: Sequence[Mapping[str, Any]] | None = None,
    extraction: Extraction = "lenient",
    title: str = "persona-align benchmark report",
    n_boot: int = 1000,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Load, score, and write ``out_dir`` (report files plus ``scored/<system>.jsonl``)."""
    metrics = list(dict.fromkeys(metrics))  # a name given twice is scored once
    if not metrics:
        raise InputError(None, "--metrics is empty")
    unknown = sorted(set(options or {}) - set(metrics))
    if unknown:
        raise InputError(None, f"--opt names metric {unknown[0]!r}, which is not in --metrics")
    check_output_folder(out_dir)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    dialogues = read_dialogues("jsonl", dialogues_path)
    if not dialogues:
        raise InputError(dialogues_path, "no dialogues")
    systems = load_systems(system_args, dialogues, extraction)
    for system in systems:  # now, not after scoring the others
        check_answered(system.name, system.records)
    if baseline is not None and baseline not in {s.name for s in systems}:
        names = ", ".join(s.name for s in systems)
        raise InputError(None, f"--baseline {baseline!r} is not a system; systems: {names}")
    timings["read inputs"] = time.perf_counter() - began

    scored, infos, score_times = score_systems(
        systems, dialogues, metrics, options, cache_path, console
    )
    timings |= score_times

    began = time.perf_counter()
    files: dict[str, str] = {}
    for system in systems:
        stem = safe_name(system.name)
        while f"scored/{stem}.jsonl" in files.values():
            stem += "_"
        files[system.name] = f"scored/{stem}.jsonl"
        write_records(out_dir / files[system.name], scored[system.name], ScoredCandidate)
    timings["write scored"] = time.perf_counter() - began

    sources = {
        s.name: {
            "file": str(s.path),
            "kind": s.kind,
            "scored_file": files[s.name],
            "metrics_from_file": [m for m in metrics if not _needs(s, m)]
            if s.kind == "scored"
            else [],
        }
        for s in systems
    }
    answered = {r.dialogue_id for records in scored.values() for r in records}
    roles = dict(sorted(Counter(d.persona_role for d in dialogues if d.id in answered).items()))
    began = time.perf_counter()
    summary = write_report(
        out_dir, scored, infos, training_log=training_log, baseline=baseline, title=title,
        n_boot=n_boot, seed=seed,
        extra={"sources": sources, "timings_s": dict(timings), "persona_roles": roles},
    )  # fmt: skip
    summary["timings_s"]["report"] = time.perf_counter() - began
    return summary
