"""``persona-align bench``: score systems on the same dialogues and write a benchmark report.

Registered by ``cli/app.py`` as the ``bench`` command; the work lives in
:mod:`persona_align.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from persona_align.cli.output import console, emit, warn_extraction
from persona_align.errors import InputError
from persona_align.files import require_file

DEFAULT_METRICS = "c,ue,p,lfc,dist-1,dist-2,bleu-1,rouge-l"  # = report.DEFAULT_METRICS


def _table(summary: dict[str, Any]) -> Table:
    metrics = list(summary["metrics"])
    table = Table(title="mean ± std per system", title_justify="left", box=None, padding=(0, 1))
    for column in ("#", "system", "errors", "failure", "time s", *metrics):
        table.add_column(column, justify="left" if column == "system" else "right", no_wrap=True)
    position = {row["system"]: row["position"] for row in summary["ranking"]["order"]}
    for system in sorted(summary["systems"], key=position.__getitem__):
        entry = summary["systems"][system]
        cells = []
        for name in metrics:
            cell = entry["metrics"].get(name)
            if cell is None:
                cells.append("-" if summary["metrics"][name]["available"] else "unavailable")
            else:
                cells.append(f"{cell['mean']:.3f}±{cell['std']:.3f}")
        latency = entry["mean_latency_s"]
        table.add_row(
            str(position[system]), system, str(entry["errors"]), f"{entry['failure_ratio']:.3f}",
            "-" if latency is None else f"{latency:.2f}", *cells,
        )  # fmt: skip
    return table


def bench_command(
    dialogues: Annotated[
        Path, typer.Option("--dialogues", "-d", help="Dialogue records every system answered.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder to write.")],
    systems: Annotated[
        list[str],
        typer.Option(
            "--systems",
            "-s",
            help="System file: Candidate or ScoredCandidate records, or a responses CSV "
            "row-aligned with the dialogues; NAME=FILE names it. Further files may follow.",
        ),
    ] = [],  # noqa: B006
    more: Annotated[
        list[str] | None, typer.Argument(help="More system files (after --systems).")
    ] = None,
    metrics: Annotated[
        str, typer.Option(help="Comma-separated metric names (see `score --help`).")
    ] = DEFAULT_METRICS,
    opt: Annotated[
        list[str], typer.Option("--opt", help="Metric option METRIC.KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    baseline: Annotated[
        str | None, typer.Option(help="System to compare every other one against (paired).")
    ] = None,
    training_log: Annotated[
        Path | None, typer.Option(help="Trainer log (JSONL, one logged step a line) to plot.")
    ] = None,
    extraction: Annotated[
        str,
        typer.Option(
            help="CSV systems: lenient | strict | none (the CSV holds extracted replies)."
        ),
    ] = "lenient",
    cache: Annotated[
        Path | None, typer.Option(help="Score cache (default: in the user cache folder).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the score cache.")
    ] = False,
    title: Annotated[str, typer.Option(help="Report title.")] = "persona-align benchmark report",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples per interval.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and randomization tests.")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary as the last line.")
    ] = False,
) -> None:
    """Score systems on the same dialogues; write report.md, report.html and summary.json."""
    from persona_align.metrics import parse_metric_options
    from persona_align.models import cache_dir
    from persona_align.report import run_bench

    if extraction not in {"lenient", "strict", "none"}:
        raise InputError(None, f"--extraction must be lenient, strict or none, got {extraction!r}")
    if n_boot < 1:
        raise InputError(None, f"--n-boot must be positive, got {n_boot}")
    names = [n.strip() for n in metrics.split(",") if n.strip()]
    log = None
    if training_log is not None:
        from persona_align.training.curves import read_training_log

        log = read_training_log(require_file(training_log))
        if not log:
            raise InputError(training_log, "no logged step (expected one JSON object a line)")
    summary = run_bench(
        dialogues,
        [*systems, *(more or [])],
        output,
        names,
        options=parse_metric_options(opt),
        cache_path=None if no_cache else (cache or cache_dir() / "scores.sqlite"),
        baseline=baseline,
        training_log=log,
        extraction=extraction,  # type: ignore[arg-type]
        title=title,
        n_boot=n_boot,
        seed=seed,
        console=None if as_json else console,
    )
    for system, entry in summary["systems"].items():
        warn_extraction(system, entry["failure_ratio"], entry["responses"], "--extraction none")
    files = {name: str(output / name) for name in ("report.md", "report.html", "summary.json")}
    if as_json:
        emit(_json_summary(summary, output, files), as_json)
        return
    console.print(_table(summary))
    for name, info in summary["metrics"].items():
        if not info["available"]:
            console.print(f"[yellow]{name}: unavailable: {info['reason']}[/yellow]")
    for key, reason in summary["plots_missing"].items():
        console.print(f"[dim]plot {key} not drawn: {reason}[/dim]")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items())
    console.print(f"Wrote {', '.join(files.values())} ({timing})")


def _json_summary(summary: dict[str, Any], output: Path, files: dict[str, str]) -> dict[str, Any]:
    """The ``--json`` line: where the report went, each system's means, the ranking."""
    return {
        "command": "bench",
        "output": str(output),
        "dialogues": summary["dialogues"],
        "files": files,
        "metrics": summary["metrics"],
        "ranking": [row["system"] for row in summary["ranking"]["order"]],
        "systems": {
            name: {
                "errors": entry["errors"],
                "failure_ratio": entry["failure_ratio"],
                "mean_latency_s": entry["mean_latency_s"],
                "means": {m: (c["mean"] if c else None) for m, c in entry["metrics"].items()},
            }
            for name, entry in summary["systems"].items()
        },
        "plots": sorted(summary["plots"]),
        "timings_s": summary["timings_s"],
    }
