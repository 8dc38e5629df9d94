"""``persona-align``: one command per pipeline stage.

Exit codes: 0 success, 2 bad input or configuration (one line naming file, place and field),
3 model calls still failing after retries (a server down; a rerun retries only those),
1 anything else. ``--json`` prints a machine-readable summary as the last line of output.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.console import Console
from rich.table import Table

from persona_align.commands_judge import judge_app, train_judge_command
from persona_align.commands_methods import train_pal_command, train_sbs_command
from persona_align.commands_nli import nli_app, train_nli_command
from persona_align.commands_train import train_dpo_command, train_sft_command
from persona_align.data import READERS, read_dialogues
from persona_align.data.responses import extraction_warning, import_responses
from persona_align.data.stats import describe, load
from persona_align.errors import CallsFailed, InputError
from persona_align.files import check_output_file, require_file
from persona_align.preference.total import DEFAULT_WEIGHTS
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


@app.callback()
def _policy(
    device: Annotated[
        str | None,
        typer.Option(
            help="Where every model loads: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps. "
            "Overrides a config's device:.",
            envvar="PERSONA_ALIGN_DEVICE",
        ),
    ] = None,
    attn_implementation: Annotated[
        str | None,
        typer.Option(help="sdpa (default), eager or flash_attention_2 (needs flash-attn)."),
    ] = None,
) -> None:
    """Make dialogue models stay in character: data, candidates, scores, pairs, training."""
    from persona_align import devices

    devices.reset()  # one policy per invocation (main() may run several in one process)
    devices.configure(device, attn_implementation, explicit=device is not None)


train_app = typer.Typer(
    help="Train models: score-weighted DPO, SFT, PAL, SBS, our judges and the NLI model.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")
train_app.command("nli")(train_nli_command)
train_app.command("judge")(train_judge_command)
train_app.command("dpo")(train_dpo_command)
train_app.command("sft")(train_sft_command)
train_app.command("pal")(train_pal_command)
train_app.command("sbs")(train_sbs_command)
app.add_typer(
    nli_app, name="nli", help="The NLI model behind C and UE: accuracy on labelled pairs."
)
app.add_typer(
    judge_app, name="judge", help="Our judges (C, coherence): agreement with readers' labels."
)

console = Console()
JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line.")]


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, sort_keys=True))


def _warn(system: str, failure_ratio: float, replies: int, option: str) -> None:
    """A system whose replies nearly all failed extraction: one line on stderr."""
    line = extraction_warning(system, failure_ratio, replies, option)
    if line is not None:
        print(line, file=sys.stderr)


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
    check_output_file(output)
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
    check_output_file(output)
    dialogues = read_dialogues("jsonl", dialogues_path)
    candidates = import_responses(responses, dialogues, responder, extraction, variant)  # type: ignore[arg-type]
    write_records(output, candidates, Candidate)
    summary = {"command": "data import-responses", "output": str(output)} | describe(candidates)
    for name, entry in summary["responders"].items():
        _warn(name, 1 - entry["valid"] / entry["candidates"], entry["candidates"],
              "--extraction none")  # fmt: skip
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


def parse_responder_spec(spec: str, **defaults: Any) -> tuple[str, dict[str, Any]]:
    """``hf:MODEL``, ``openai:MODEL@BASE_URL[,BASE_URL...]`` (replicas of one model) or
    ``import:FILE`` into (kind, options)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InputError(
            None, f"responder spec {spec!r}: expected hf:MODEL, openai:MODEL@URL or import:FILE"
        )
    if kind == "hf":
        return kind, {
            "model": rest,
            "dtype": defaults["dtype"],
            "batch_size": defaults["batch_size"],
        }
    if kind == "openai":
        from persona_align.generation.openai_responder import spec_base_url

        model, _, base_url = rest.partition("@")
        options = {k: defaults[k] for k in ("api_key_env", "concurrency", "timeout")}
        return kind, {"model": model, "base_url": spec_base_url(base_url), **options}
    if kind == "import":
        return kind, {"path": rest, "extraction": defaults.get("import_extraction")}
    # not the whole spec: what follows the kind may be a URL with a key in it
    raise InputError(None, f"responder spec: unknown kind {kind!r} (hf, openai, import)")


@app.command("generate")
def generate(
    config: Annotated[
        Path | None, typer.Option(help="Pipeline YAML with a generate: section.")
    ] = None,
    responder: Annotated[
        list[str],
        typer.Option(
            "--responder",
            "-r",
            help="hf:MODEL | openai:MODEL@URL[,URL...] | import:FILE (repeatable).",
        ),
    ] = [],  # noqa: B006
    dialogues: Annotated[
        Path | None, typer.Option("--dialogues", "-d", help="Dialogue records.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Candidate file to write.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="hf: prompts per batch.")] = 8,
    dtype: Annotated[
        str, typer.Option(help="hf: auto (the device's default) | float32 | bfloat16 | float16.")
    ] = "auto",
    api_key_env: Annotated[
        str, typer.Option(help="openai: variable that holds the API key.")
    ] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="openai: requests in flight.")] = 8,
    timeout: Annotated[float, typer.Option(help="openai: seconds per request.")] = 60.0,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens to generate (PersoBench: 110).")
    ] = 110,
    temperature: Annotated[float, typer.Option(help="0 = greedy (PersoBench).")] = 0.0,
    variant: Annotated[str, typer.Option(help="Prompt variant: vanilla | cot.")] = "vanilla",
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    extraction: Annotated[str, typer.Option(help="lenient | strict JSON extraction.")] = "lenient",
    import_extraction: Annotated[
        str | None,
        typer.Option(
            help="import: none = the files already hold extracted replies (empty = failure)."
        ),
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="SQLite cache (default: in the user cache folder).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Regenerate everything, updating the cache.")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Only the first N dialogues.", min=1)] = None,
    as_json: JsonFlag = False,
) -> None:
    """Ask one or more responders for a reply to every dialogue; resumable through a cache."""
    from persona_align.config import GenerateConfig, ParamsConfig, ResponderConfig, load_config
    from persona_align.generation import (
        GenerationParams,
        check_calls,
        make_responders,
        run_responders,
    )

    if config is not None:
        if responder or dialogues or output:
            raise InputError(None, "give either --config or --responder/--dialogues/-o, not both")
        section = load_config(config).generate
        if section is None:
            raise InputError(config, "no generate: section")
        for key in ("dialogues", "output"):
            if getattr(section, key) is None:
                raise InputError(config, "missing (needed by generate)", field=f"generate.{key}")
    else:
        if not responder or dialogues is None or output is None:
            raise InputError(None, "generate needs --config, or --responder, --dialogues and -o")
        defaults = {
            "dtype": dtype,
            "batch_size": batch_size,
            "api_key_env": api_key_env,
            "concurrency": concurrency,
            "timeout": timeout,
            "import_extraction": import_extraction,
        }
        specs = [parse_responder_spec(spec, **defaults) for spec in responder]
        try:
            params_config = ParamsConfig(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                variant=variant,  # type: ignore[arg-type]
                system=system,
                extraction=extraction,  # type: ignore[arg-type]
            )
        except ValueError as err:
            raise InputError(None, str(err).splitlines()[-1].strip()) from None
        section = GenerateConfig(
            dialogues=dialogues,
            output=output,
            responders=[ResponderConfig(kind=kind, **options) for kind, options in specs],
            params=params_config,
            cache=cache,
            use_cache=not no_cache,
        )
    check_output_file(section.output)
    rows = read_dialogues("jsonl", section.dialogues)[:limit]
    if not rows:
        raise InputError(section.dialogues, "no dialogues")
    params = GenerationParams(**section.params.model_dump())
    responders = make_responders(
        [(r.kind, r.options()) for r in section.responders],
        config,
        "generate.responders" if config is not None else None,
    )
    candidates = run_responders(rows, responders, params, section.cache, section.use_cache,
                                refresh, None if as_json else console)  # fmt: skip
    write_records(section.output, candidates, Candidate)
    summary = {"command": "generate", "output": str(section.output)} | describe(candidates)
    for name, entry in summary["responders"].items():
        _warn(name, 1 - entry["valid"] / entry["candidates"], entry["candidates"],
              "--import-extraction none (extraction: none on an import responder)")  # fmt: skip
    if not as_json:
        console.print(f"Wrote {len(candidates)} candidates to {section.output}")
        for name, entry in summary["responders"].items():
            errors = f", {entry['errors']} call errors" if entry["errors"] else ""
            console.print(
                f"  {name}: {entry['valid']}/{entry['candidates']} valid{errors}, "
                f"mean latency {entry['mean_latency_s']} s"
            )
    _emit(summary, as_json)
    check_calls(candidates, responders)  # exit 3 when calls still fail; a rerun retries them


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


@app.command("score")
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

    from persona_align.metrics import make_metric, parse_metric_options
    from persona_align.metrics.aggregate import summarize
    from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
    from persona_align.models import cache_dir
    from persona_align.records import ScoredCandidate, atomic_open, iter_jsonl, read_records

    names = [n.strip() for n in metrics.split(",") if n.strip()]
    if not names:
        raise InputError(None, "--metrics is empty")
    options = parse_metric_options(opt)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise InputError(None, f"--opt names metric {unknown[0]!r}, which is not in --metrics")
    instances = [make_metric(name, **options.get(name, {})) for name in names]
    check_output_file(output)
    rows = read_dialogues("jsonl", dialogues)
    if not rows:
        raise InputError(dialogues, "no dialogues")
    by_id = {d.id: d for d in rows}
    stream: Iterator[Candidate]
    if candidates.suffix.lower() in {".parquet", ".pq"}:
        loaded = read_records(candidates, Candidate)
        total, stream = len(loaded), iter(loaded)
    else:  # streamed: counted first, for the progress bar
        total, stream = _count_lines(require_file(candidates)), iter_jsonl(candidates, Candidate)
    if not total:
        raise InputError(candidates, "no candidates")
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
        _warn(system, entry["failure_ratio"], entry["responses"],
              "--extraction none when importing them (data import-responses)")  # fmt: skip
    if not as_json:
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
    _emit(summary, as_json)


pairs_app = typer.Typer(help="Preference pairs from scored candidates (TRL's format).")
app.add_typer(pairs_app, name="pairs")


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
    _emit(summary, as_json)


@pairs_app.command("stats")
def pairs_stats(
    file: Annotated[Path, typer.Argument(help="A pair file.")], as_json: JsonFlag = False
) -> None:
    """Counts, score gaps, weights and per-rule totals of a pair file."""
    summary = describe(load(file, "pair"))
    if not as_json:
        console.print(_summary_table(str(file), summary))
    _emit({"command": "pairs stats", "file": str(file)} | summary, as_json)


def sample_path(split: str) -> Path:
    """The bundled sample dialogues of one split (``train`` or ``valid``)."""
    from persona_align.pipeline import data_location

    return data_location(f"sample:{split}")


@app.command("run")
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
    pipeline = Pipeline(loaded, config, Console(stderr=True))
    summary = pipeline.run(start)
    if not as_json:
        table = Table("stage", "status", "outputs", title=f"run {pipeline.root}",
                      title_justify="left")  # fmt: skip
        for name, entry in summary["stages"].items():
            status = "skipped (unchanged)" if entry["skipped"] else "done"
            table.add_row(name, status, "\n".join(entry["outputs"].values()))
        console.print(table)
        console.print(f"finished in {summary['seconds']} s")
    _emit(summary, as_json)


def _run_methods(config: Any, methods: list[str], start: str | None, as_json: bool) -> None:
    """A method config (PAL, SBS) runs its own stages, each skipped when done; a crashed
    training stage resumes from its checkpoint."""
    from persona_align.commands_methods import pal_pipeline, sbs_pipeline

    if start is not None:
        raise InputError(None, "--from applies to pipeline stages; a method skips finished "
                         "stages by itself (delete a stage's folder to redo it)")  # fmt: skip
    runners = {"pal": pal_pipeline, "sbs": sbs_pipeline}
    err = Console(stderr=True)
    summary = {"command": "run", "methods": {m: runners[m](getattr(config, m), True, err)
                                             for m in methods}}  # fmt: skip
    if not as_json:
        for method, entry in summary["methods"].items():
            console.print(f"{method}: ran {entry.get('ran')}, skipped {entry.get('skipped')}")
    _emit(summary, as_json)


# Commands that live in their own modules register here, one line each.
from persona_align.commands_report import bench_command  # noqa: E402

app.command("bench")(bench_command)
from persona_align.commands_serve import chat_command, serve_command  # noqa: E402

app.command("serve")(serve_command)
app.command("chat")(chat_command)
# (end of command registrations)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; InputError becomes exit 2 and CallsFailed exit 3,
    each with one line on stderr."""
    # our own rich progress bars report long work; the libraries' tqdm bars would interleave
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF conversion bar
    try:
        app(args=argv, prog_name="persona-align")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CallsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except SystemExit as exit_:  # click's own handling: usage errors exit 2, --help exits 0
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
