"""`persona-align run CONFIG`: every stage of a pipeline config, or a method (PAL, SBS)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from persona_align.cli.output import JsonFlag, console, emit, err_console
from persona_align.errors import InputError


def sample_path(split: str) -> Path:
    """The bundled sample dialogues of one split (``train`` or ``valid``)."""
    from persona_align.pipeline import data_location

    return data_location(f"sample:{split}")


def run_pipeline(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML: one section per stage.")],
    start: Annotated[
        str | None,
        typer.Option("--from", help="Rerun from this stage on, even if unchanged."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run every stage of a config into runs/<name>/; unchanged stages are skipped."""
    from persona_align.config import STAGES, load_config
    from persona_align.pipeline import Pipeline

    loaded = load_config(config)
    methods = [m for m in ("pal", "sbs") if getattr(loaded, m) is not None]
    if methods and any(getattr(loaded, s) is not None for s in STAGES):
        raise InputError(config, "a run config holds pipeline stages or a method (pal:/sbs:), "
                         "not both", field=methods[0])  # fmt: skip
    if methods:
        _run_methods(loaded, methods, start, as_json)
        return
    pipeline = Pipeline(loaded, config, err_console)
    summary = pipeline.run(start)
    if not as_json:
        table = Table("stage", "status", "outputs", title=f"run {pipeline.root}",
                      title_justify="left")  # fmt: skip
        for name, entry in summary["stages"].items():
            status = "skipped (unchanged)" if entry["skipped"] else "done"
            table.add_row(name, status, "\n".join(entry["outputs"].values()))
        console.print(table)
        console.print(f"finished in {summary['seconds']} s")
    emit(summary, as_json)


def _run_methods(config: Any, methods: list[str], start: str | None, as_json: bool) -> None:
    """A method config (PAL, SBS) runs its own stages, each skipped when done; a crashed
    training stage resumes from its checkpoint."""
    from persona_align.methods import pal_pipeline, sbs_pipeline

    if start is not None:
        raise InputError(None, "--from applies to pipeline stages; a method skips finished "
                         "stages by itself (delete a stage's folder to redo it)")  # fmt: skip
    runners = {"pal": pal_pipeline, "sbs": sbs_pipeline}
    summary = {"command": "run", "methods": {m: runners[m](getattr(config, m), True, err_console)
                                             for m in methods}}  # fmt: skip
    if not as_json:
        for method, entry in summary["methods"].items():
            console.print(f"{method}: ran {entry.get('ran')}, skipped {entry.get('skipped')}")
    emit(summary, as_json)
