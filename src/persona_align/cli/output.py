"""What every command shares: the consoles, the ``--json`` and ``--resume`` flags, the JSON
summary line, the one-line warnings, ``--opt KEY=VALUE`` parsing and summary tables."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from persona_align.data.responses import extraction_warning
from persona_align.errors import InputError

console = Console()
err_console = Console(stderr=True)  # progress and tables of commands whose stdout is data
JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line.")]
ResumeFlag = Annotated[
    bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")
]


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """The machine-readable summary, as the last line of output (flushed: a server's first line
    is read by its caller while it keeps running)."""
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, sort_keys=True), flush=True)


def warn_extraction(system: str, failure_ratio: float, replies: int, option: str) -> None:
    """A system whose replies nearly all failed extraction: one line on stderr."""
    line = extraction_warning(system, failure_ratio, replies, option)
    if line is not None:
        print(line, file=sys.stderr)


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(None, f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = value
    return options


def summary_table(title: str, summary: dict[str, Any]) -> Table:
    """Two columns, one row per summary key; dicts (counts) on one line."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) if value else "-"
        table.add_row(key.replace("_", " "), str(value))
    return table


def num(value: float | None) -> str:
    """A metric value for a table: 4 decimals, or - when there is none."""
    return "-" if value is None else f"{value:.4f}"
