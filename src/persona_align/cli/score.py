"""`persona-align score`: metric values for candidates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from persona_align.cli.output import (
    JsonFlag,
    console,
    emit,
    warn_extraction,
)
from persona_align.data import read_dialogues
from persona_align.errors import InputError
from persona_align.files import check_output_file, require_file
from persona_align.records import Candidate, write_records


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def score(
    dialogues: Annotated[Path, typer.Option("--dialogues", "-d", help="Dialogue records.")],
    candidates: Annotated[
        Path, typer.Option("--candidates", "-c", help="Candidate records to score.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="ScoredCandidate file to write.")],
    metrics: Annotated[
        str, typer.Option(help="Comma-separated metric names (see `score --list`).")
    ] = "lfc",
    opt: Annotated[
        list[str], typer.Option("--opt", help="Metric option METRIC.KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    cache: Annotated[
        Path | None, typer.Option(help="Score cache (default: in the user cache folder).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Score candidates with persona metrics; failures get each metric's worst value."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from persona_align.metrics.aggregate import summarize
    from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
    from persona_align.models import cache_dir
    from persona_align.records import ScoredCandidate, atomic_open

    names, instances = _metrics(metrics, opt)
    check_output_file(output)
    rows = read_dialogues("jsonl", dialogues)
    if not rows:
        raise InputError(dialogues, "no dialogues")
    by_id = {d.id: d for d in rows}
    total, stream = _candidates(candidates)
    store = None if no_cache else ScoreCache(cache or cache_dir() / "scores.sqlite")
    try:
        statuses = prepare_metrics(instances, rows)
        with Progress(
            TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=as_json,
        ) as progress:  # fmt: skip
            task = progress.add_task("score", total=total)
            results = score_stream(by_id, stream, instances, statuses, store, source=candidates)
            if output.suffix.lower() in {".parquet", ".pq"}:
                scored = list(results)
                write_records(output, scored, ScoredCandidate)
                table_data = summarize(scored, names)
            else:  # streamed: memory stays flat however many candidates there are
                with atomic_open(output) as handle:

                    def written() -> Iterator[ScoredCandidate]:
                        for item in results:
                            handle.write(item.model_dump_json() + "\n")
                            progress.advance(task)
                            yield item

                    table_data = summarize(written(), names)
    finally:
        if store is not None:
            store.close()
    summary = {
        "command": "score",
        "output": str(output),
        "metrics": {
            s.name: {
                "model": s.model,
                "available": s.available,
                "reason": s.reason,
                "settings": s.settings,
            }
            for s in statuses
        },
        "systems": table_data,
    }
    for system, entry in table_data.items():
        hint = "--extraction none when importing them (data import-responses)"
        warn_extraction(system, entry["failure_ratio"], entry["responses"], hint)
    if not as_json:
        _print_scores(output, names, statuses, table_data)
    emit(summary, as_json)


def _metrics(metrics: str, opt: list[str]) -> tuple[list[str], list[Any]]:
    """(names, metric instances) from ``--metrics`` and ``--opt METRIC.KEY=VALUE``."""
    from persona_align.metrics import make_metric, parse_metric_options

    names = [n.strip() for n in metrics.split(",") if n.strip()]
    if not names:
        raise InputError(None, "--metrics is empty")
    options = parse_metric_options(opt)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise InputError(None, f"--opt names metric {unknown[0]!r}, which is not in --metrics")
    return names, [make_metric(name, **options.get(name, {})) for name in names]


def _candidates(path: Path) -> tuple[int, Iterator[Candidate]]:
    """(how many, the candidates): Parquet read whole, JSONL streamed (counted first, for the
    progress bar)."""
    from persona_align.records import iter_jsonl, read_records

    if path.suffix.lower() in {".parquet", ".pq"}:
        loaded = read_records(path, Candidate)
        total, stream = len(loaded), iter(loaded)
    else:
        total, stream = _count_lines(require_file(path)), iter_jsonl(path, Candidate)
    if not total:
        raise InputError(path, "no candidates")
    return total, stream


def _print_scores(
    output: Path, names: list[str], statuses: list[Any], table_data: dict[str, Any]
) -> None:
    """Mean ± std per system and metric, then what was left out or unavailable."""
    table = Table(
        title=f"{output}: mean ± std per system", title_justify="left", box=None, padding=(0, 1)
    )
    table.add_column("system", no_wrap=True)
    for column in ("n", "errors", "failure", "latency s", *names):
        table.add_column(column, justify="right", no_wrap=True)
    for system, entry in table_data.items():
        cells = []
        for name, status in zip(names, statuses, strict=True):
            m = entry["metrics"].get(name)
            cells.append(
                "unavailable"
                if not status.available
                else (f"{m['mean']:.2f}±{m['std']:.2f}" if m else "-")
            )
        latency, failure = entry["mean_latency_s"], entry["failure_ratio"]
        table.add_row(system, str(entry["responses"]), str(entry["errors"]),
                      "-" if failure is None else f"{failure:.3f}",
                      "-" if latency is None else f"{latency:.2f}", *cells)  # fmt: skip
    console.print(table)
    errors = sum(entry["errors"] for entry in table_data.values())
    if errors:
        console.print(
            f"[yellow]{errors} candidates hold a call error (no reply came back): left out "
            "of every number; rerun generate to retry them[/yellow]"
        )
    for status in statuses:
        if not status.available:
            console.print(f"[yellow]{status.name}: unavailable: {status.reason}[/yellow]")
