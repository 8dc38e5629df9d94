"""`persona-align data ...`: import, inspect and validate record files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from persona_align.cli.output import (
    JsonFlag,
    console,
    emit,
    parse_options,
    summary_table,
    warn_extraction,
)
from persona_align.data import READERS, read_dialogues
from persona_align.data.responses import import_responses
from persona_align.data.stats import describe, load
from persona_align.errors import InputError
from persona_align.files import check_output_file
from persona_align.records import Candidate, Dialogue, write_records

data_app = typer.Typer(
    help="Import, inspect and validate dialogue and record files.", no_args_is_help=True
)


@data_app.command("import")
def data_import(
    input: Annotated[Path, typer.Argument(help="The dataset file to read.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Dialogue file to write (.jsonl or .parquet).")
    ],
    format: Annotated[
        str, typer.Option("--format", "-f", help="Input format; see `data formats`.")
    ],
    opt: Annotated[
        list[str], typer.Option("--opt", help="Reader option KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    as_json: JsonFlag = False,
) -> None:
    """Read a dataset in a published format and write Dialogue records."""
    check_output_file(output)
    dialogues = read_dialogues(format, input, **parse_options(opt))
    if not dialogues:
        raise InputError(input, "no dialogues found")
    write_records(output, dialogues, Dialogue)
    summary = {"command": "data import", "format": format, "output": str(output)} | describe(
        dialogues
    )
    if not as_json:
        console.print(f"Wrote {len(dialogues)} dialogues to {output}")
        console.print(summary_table(f"{input.name} ({format})", describe(dialogues)))
    emit(summary, as_json)


@data_app.command("import-responses")
def data_import_responses(
    responses: Annotated[
        Path, typer.Argument(help="Responses CSV (row-aligned) or JSONL keyed by dialogue id.")
    ],
    dialogues_path: Annotated[
        Path, typer.Option("--dialogues", "-d", help="Dialogue records the responses answer.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Candidate file to write.")],
    responder: Annotated[
        str | None, typer.Option(help="Responder name (default: the file name).")
    ] = None,
    extraction: Annotated[
        str,
        typer.Option(help="lenient | strict | none (the file already holds extracted replies)."),
    ] = "lenient",
    variant: Annotated[
        str, typer.Option(help="Prompt variant the responses answered: vanilla | cot.")
    ] = "vanilla",
    as_json: JsonFlag = False,
) -> None:
    """Attach existing model outputs to dialogues as Candidate records."""
    if extraction not in {"lenient", "strict", "none"}:
        raise InputError(None, f"--extraction must be lenient, strict or none, got {extraction!r}")
    if variant not in {"vanilla", "cot"}:
        raise InputError(None, f"--variant must be vanilla or cot, got {variant!r}")
    check_output_file(output)
    dialogues = read_dialogues("jsonl", dialogues_path)
    candidates = import_responses(responses, dialogues, responder, extraction, variant)  # type: ignore[arg-type]
    write_records(output, candidates, Candidate)
    summary = {"command": "data import-responses", "output": str(output)} | describe(candidates)
    for name, entry in summary["responders"].items():
        failed = 1 - entry["valid"] / entry["candidates"]
        warn_extraction(name, failed, entry["candidates"], "--extraction none")
    if not as_json:
        valid = sum(c.valid for c in candidates)
        console.print(
            f"Wrote {len(candidates)} candidates to {output}: {valid} valid "
            f"({valid / len(candidates):.1%}), {len(candidates) - valid} failures"
        )
    emit(summary, as_json)


RecordType = Annotated[
    str, typer.Option("--type", "-t", help="auto | dialogue | candidate | scored | pair")
]


@data_app.command("stats")
def data_stats(
    file: Annotated[Path, typer.Argument(help="A record file (.jsonl or .parquet).")],
    kind: RecordType = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Counts and spreads of a record file."""
    summary = describe(load(file, kind))
    if not as_json:
        console.print(summary_table(str(file), summary))
    emit({"command": "data stats", "file": str(file)} | summary, as_json)


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="A record file (.jsonl or .parquet).")],
    kind: RecordType = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Check every record against the schema; the first problem is reported with its line."""
    records = load(file, kind)
    ids = [getattr(r, "id", None) for r in records]
    seen: set[str] = set()
    for lineno, record_id in enumerate(ids, start=1):
        if record_id is not None and record_id in seen:
            raise InputError(
                file, f"duplicate id {record_id!r}", where=f"record {lineno}", field="id"
            )
        if record_id is not None:
            seen.add(record_id)
    kind_name = describe(records).get("type", kind)
    if not as_json:
        console.print(f"{file}: {len(records)} valid {kind_name} records")
    emit(
        {
            "command": "data validate",
            "file": str(file),
            "records": len(records),
            "type": kind_name,
            "ok": True,
        },
        as_json,
    )


@data_app.command("formats")
def data_formats(as_json: JsonFlag = False) -> None:
    """List the dataset formats `data import` reads."""
    if not as_json:
        table = Table("format", "reads", "options", title="Dataset readers", title_justify="left")
        for reader in READERS.values():
            table.add_row(reader.name, reader.help, ", ".join(reader.options) or "-")
        console.print(table)
    emit({"formats": {r.name: r.help for r in READERS.values()}}, as_json)
