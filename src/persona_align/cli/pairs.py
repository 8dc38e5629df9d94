"""`persona-align pairs`: preference pairs from scored candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from persona_align.cli.output import (
    JsonFlag,
    console,
    emit,
    summary_table,
)
from persona_align.data import read_dialogues
from persona_align.data.stats import describe, load
from persona_align.errors import InputError
from persona_align.files import check_output_file
from persona_align.preference.total import DEFAULT_WEIGHTS
from persona_align.records import write_records

pairs_app = typer.Typer(help="Preference pairs from scored candidates (TRL's format).")


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise InputError(None, f"--weights expects METRIC=NUMBER,..., got {part!r}") from None
        if not sep:
            raise InputError(None, f"--weights expects METRIC=NUMBER,..., got {part!r}")
    if not weights:
        raise InputError(None, "--weights is empty")
    return weights


@pairs_app.callback(invoke_without_command=True)
def pairs(
    ctx: typer.Context,
    scored: Annotated[
        Path | None, typer.Option("--scored", "-s", help="ScoredCandidate file.")
    ] = None,
    dialogues: Annotated[
        Path | None, typer.Option("--dialogues", "-d", help="Dialogue records.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Pair file to write.")
    ] = None,
    rule: Annotated[str, typer.Option(help="quantile | margin | best-worst | format")] = "quantile",
    weights: Annotated[
        str, typer.Option(help="Total-score weights METRIC=W,... (PersoDPO's by default).")
    ] = ",".join(f"{k}={v}" for k, v in DEFAULT_WEIGHTS.items()),
    upper: Annotated[float, typer.Option(help="quantile: chosen at or above this quantile.")] = 0.6,
    lower: Annotated[
        float, typer.Option(help="quantile: rejected at or below this quantile.")
    ] = 0.4,
    margin: Annotated[float, typer.Option(help="margin: minimum gap of total scores.")] = 0.1,
    max_per_dialogue: Annotated[int | None, typer.Option(help="Cap of pairs per dialogue.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the per-dialogue cap sampling.")] = 0,
    weight: Annotated[
        str,
        typer.Option(help="Pair weight column (what train dpo uses): sigmoid (PersoDPO) | one."),
    ] = "sigmoid",
    response_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Replies as json | text | raw (as written); auto = raw for the format rule, "
            "else json.",
        ),
    ] = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Turn scored candidates into DPO pairs: `pairs -s S -d D -o P`, or `pairs stats FILE`."""
    if ctx.invoked_subcommand is not None:
        return
    from persona_align.preference import PairingConfig, build_pairs, fit_minmax, total_score
    from persona_align.preference.pairs import PairFormat, PairWeight
    from persona_align.records import PreferencePair, ScoredCandidate, read_records

    if scored is None or dialogues is None or output is None:
        raise InputError(None, "pairs needs --scored, --dialogues and -o (or: pairs stats FILE)")
    weights_known, formats_known = get_args(PairWeight), get_args(PairFormat)
    if weight not in weights_known or response_format not in formats_known:
        raise InputError(
            None,
            f"--weight must be one of {', '.join(weights_known)}; "
            f"--format must be one of {', '.join(formats_known)}",
        )
    config = PairingConfig(
        rule=rule, upper=upper, lower=lower, margin=margin, max_pairs_per_dialogue=max_per_dialogue,
        seed=seed, weight=weight, response_format=response_format,  # type: ignore[arg-type]
    )  # fmt: skip
    config.check()
    check_output_file(output)
    rows = read_records(scored, ScoredCandidate)
    if not rows:
        raise InputError(scored, "no scored candidates")
    by_id = {d.id: d for d in read_dialogues("jsonl", dialogues)}
    if rule != "format":
        chosen_weights = _parse_weights(weights)
        ranges = fit_minmax(rows, chosen_weights)
        rows = [
            r.model_copy(update={"total": total_score(r.scores, chosen_weights, ranges)})
            for r in rows
        ]
    made = build_pairs(by_id, rows, config)
    write_records(output, made, PreferencePair)
    summary = {"command": "pairs", "output": str(output)} | describe(made)
    if not as_json:
        console.print(
            f"Wrote {len(made)} {rule} pairs "
            f"for {summary.get('dialogues', 0)} dialogues to {output}"
        )
    emit(summary, as_json)


@pairs_app.command("stats")
def pairs_stats(
    file: Annotated[Path, typer.Argument(help="A pair file.")], as_json: JsonFlag = False
) -> None:
    """Counts, score gaps, weights and per-rule totals of a pair file."""
    summary = describe(load(file, "pair"))
    if not as_json:
        console.print(summary_table(str(file), summary))
    emit({"command": "pairs stats", "file": str(file)} | summary, as_json)
