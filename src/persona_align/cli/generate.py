"""`persona-align generate`: candidates from responders (hf, openai, import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from persona_align.cli.output import (
    JsonFlag,
    console,
    emit,
    warn_extraction,
)
from persona_align.data import read_dialogues
from persona_align.data.stats import describe
from persona_align.errors import InputError
from persona_align.files import check_output_file
from persona_align.records import Candidate, write_records


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
    from persona_align.generation import (
        GenerationParams,
        check_calls,
        make_responders,
        run_responders,
    )

    options = {"dtype": dtype, "batch_size": batch_size, "api_key_env": api_key_env,
               "concurrency": concurrency, "timeout": timeout,
               "import_extraction": import_extraction}  # fmt: skip
    params_options = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                      "variant": variant, "system": system, "extraction": extraction}  # fmt: skip
    section = _section(config, responder, dialogues, output, options, params_options,
                       cache, no_cache)  # fmt: skip
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
        hint = "--import-extraction none (extraction: none on an import responder)"
        warn_extraction(name, 1 - entry["valid"] / entry["candidates"], entry["candidates"], hint)
    if not as_json:
        console.print(f"Wrote {len(candidates)} candidates to {section.output}")
        for name, entry in summary["responders"].items():
            errors = f", {entry['errors']} call errors" if entry["errors"] else ""
            console.print(
                f"  {name}: {entry['valid']}/{entry['candidates']} valid{errors}, "
                f"mean latency {entry['mean_latency_s']} s"
            )
    emit(summary, as_json)
    check_calls(candidates, responders)  # exit 3 when calls still fail; a rerun retries them


def _section(
    config: Path | None,
    responder: list[str],
    dialogues: Path | None,
    output: Path | None,
    options: dict[str, Any],
    params_options: dict[str, Any],
    cache: Path | None,
    no_cache: bool,
) -> Any:
    """The ``generate:`` section of ``--config``, or one built from the command's options."""
    from persona_align.config import GenerateConfig, ParamsConfig, ResponderConfig, load_config

    if config is not None:
        if responder or dialogues or output:
            raise InputError(None, "give either --config or --responder/--dialogues/-o, not both")
        section = load_config(config).generate
        if section is None:
            raise InputError(config, "no generate: section")
        for key in ("dialogues", "output"):
            if getattr(section, key) is None:
                raise InputError(config, "missing (needed by generate)", field=f"generate.{key}")
        return section
    if not responder or dialogues is None or output is None:
        raise InputError(None, "generate needs --config, or --responder, --dialogues and -o")
    specs = [parse_responder_spec(spec, **options) for spec in responder]
    try:
        params_config = ParamsConfig(**params_options)
    except ValueError as err:
        raise InputError(None, str(err).splitlines()[-1].strip()) from None
    return GenerateConfig(
        dialogues=dialogues,
        output=output,
        responders=[ResponderConfig(kind=kind, **options) for kind, options in specs],
        params=params_config,
        cache=cache,
        use_cache=not no_cache,
    )
