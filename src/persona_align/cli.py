"""``persona-align``: one command per pipeline stage.

Exit codes: 0 success, 2 bad input or configuration (one line naming file, place and field),
1 anything else. ``--json`` prints a machine-readable summary as the last line of output.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from persona_align.data import READERS, read_dialogues
from persona_align.data.responses import import_responses
from persona_align.data.stats import describe, load
from persona_align.errors import InputError
from persona_align.records import Candidate, Dialogue, write_records

app = typer.Typer(
    help="Make dialogue models stay in character: data, candidates, scores, pairs, training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Import, inspect and validate dialogue and record files.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console()
JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line.")]


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, sort_keys=True))


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(None, f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = value
    return options


def _summary_table(title: str, summary: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) if value else "-"
        table.add_row(key.replace("_", " "), str(value))
    return table


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
    dialogues = read_dialogues(format, input, **_parse_options(opt))
    if not dialogues:
        raise InputError(input, "no dialogues found")
    write_records(output, dialogues, Dialogue)
    summary = {"command": "data import", "format": format, "output": str(output)} | describe(
        dialogues
    )
    if not as_json:
        console.print(f"Wrote {len(dialogues)} dialogues to {output}")
        console.print(_summary_table(f"{input.name} ({format})", describe(dialogues)))
    _emit(summary, as_json)


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
    dialogues = read_dialogues("jsonl", dialogues_path)
    candidates = import_responses(responses, dialogues, responder, extraction, variant)  # type: ignore[arg-type]
    write_records(output, candidates, Candidate)
    summary = {"command": "data import-responses", "output": str(output)} | describe(candidates)
    if not as_json:
        valid = sum(c.valid for c in candidates)
        console.print(
            f"Wrote {len(candidates)} candidates to {output}: {valid} valid "
            f"({valid / len(candidates):.1%}), {len(candidates) - valid} failures"
        )
    _emit(summary, as_json)


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
        console.print(_summary_table(str(file), summary))
    _emit({"command": "data stats", "file": str(file)} | summary, as_json)


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
    _emit(
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
    _emit({"formats": {r.name: r.help for r in READERS.values()}}, as_json)


def sample_path(split: str) -> Path:
    """The bundled sample dialogues (written for this project), ``train`` or ``valid``."""
    return Path(str(resources.files("persona_align") / "sample_data" / f"{split}.jsonl"))


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo writes its files.")] = Path(
        "runs/demo"
    ),
    model: Annotated[
        str, typer.Option(help="Model whose chat template renders the prompt.")
    ] = "embedded",
    as_json: JsonFlag = False,
) -> None:
    """Run every stage that exists so far on the bundled sample data and show what it made."""
    from persona_align.models import load_tokenizer
    from persona_align.prompting import (
        extract_response,
        persobench_messages,
        prompt_hash,
        render_chat,
    )

    summary: dict[str, Any] = {"command": "demo", "out": str(out_dir), "stages": {}}
    for split in ("train", "valid"):
        dialogues = read_dialogues("jsonl", sample_path(split))
        target = out_dir / f"dialogues-{split}.jsonl"
        write_records(target, dialogues, Dialogue)
        summary["stages"][f"data:{split}"] = {"output": str(target)} | describe(dialogues)
        if not as_json:
            console.print(
                _summary_table(f"sample {split} dialogues -> {target}", describe(dialogues))
            )
    first = read_dialogues("jsonl", sample_path("valid"))[0]
    rendered = render_chat(load_tokenizer(model), persobench_messages(first))
    summary["stages"]["prompting"] = {
        "model": model,
        "dialogue": first.id,
        "prompt_hash": prompt_hash(rendered),
    }
    if not as_json:
        console.rule(f"PersoBench prompt for {first.id}, through the chat template of {model!r}")
        console.print(rendered, markup=False, highlight=False, soft_wrap=True)
        console.rule("response extraction")
    examples = [
        '{"response": "Sure, I keep bees."}',
        'Response:\n{\n  "response": "My hives are calm today."\n}',
        '{"response": "The honey harvest was cut off mid-',
    ]
    summary["stages"]["extraction"] = [
        {"raw": raw, "lenient": extract_response(raw), "strict": extract_response(raw, "strict")}
        for raw in examples
    ]
    if not as_json:
        for row in summary["stages"]["extraction"]:
            console.print(
                f"{row['raw']!r}\n  lenient -> {row['lenient']!r}   strict -> {row['strict']!r}"
            )
    _emit(summary, as_json)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; InputError becomes exit 2 with one line on stderr."""
    try:
        app(args=argv, prog_name="persona-align")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # click's own handling: usage errors exit 2, --help exits 0
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
