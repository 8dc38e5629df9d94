"""``persona-align train dpo|sft``: alignment trainers driven by a config's ``train`` section.

Every setting lives in the YAML ``train:`` section (see ``config.TrainConfig``); a few options
override it for quick runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError

from persona_align.cli.output import JsonFlag, ResumeFlag, emit, err_console, num
from persona_align.config import TrainConfig, load_config
from persona_align.errors import InputError

console = err_console
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config with a `train:` section.")
]
DataOption = Annotated[Path | None, typer.Option("--data", help="Override train.data.")]
OutputOption = Annotated[
    Path | None, typer.Option("--output-dir", "-o", help="Override train.output_dir (run folder).")
]
ModelOption = Annotated[
    str | None, typer.Option("--model", help="Override train.model: embedded, a folder, a hub id.")
]
StepsOption = Annotated[int | None, typer.Option("--max-steps", help="Override train.max_steps.")]


def train_config(
    method: Literal["dpo", "sft"],
    config: Path | None,
    overrides: dict[str, Any],
) -> TrainConfig:
    """The config file's ``train`` section (or none) with command-line overrides applied."""
    given = {k: v for k, v in overrides.items() if v is not None}
    pairs = None
    if config is not None:
        loaded = load_config(config)
        section, pairs = loaded.train, loaded.pairs
        if section is None:
            raise InputError(config, "has no `train:` section", field="train")
        if section.method != method:
            raise InputError(
                config, f"is a {section.method} config; use `train {section.method}`",
                field="train.method",
            )  # fmt: skip
        data = {**section.model_dump(), **given}
        where: Path | None = config
    else:
        data, where = {"method": method, **given}, None
    try:
        result = TrainConfig.model_validate({**data, "method": method})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InputError(where, first["msg"], field=f"train.{field}") from None
    for key in ("data", "output_dir"):
        if getattr(result, key) is None:
            hint = "" if where else " (pass --config, or --data and --output-dir)"
            raise InputError(where, f"missing{hint}", field=f"train.{key}")
    if pairs is not None and config is not None and method == "dpo":
        from persona_align.pipeline import check_pair_weights

        check_pair_weights(pairs, result, config)  # as `run` does, overrides included
    return result


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if not summary.get("main_process", True):  # other ranks of a multi-process run stay quiet
        return
    dropped = summary.get("dropped_prompt_too_long", 0)
    if dropped:
        console.print(
            f"[yellow]{dropped} example(s) dropped: prompt longer than max_length "
            f"(ids: {', '.join(summary['dropped_ids'])})"
        )
    if summary.get("truncated_completion"):
        console.print(
            f"[yellow]{summary['truncated_completion']} example(s) have their completion cut at "
            "max_length"
        )
    console.print(
        f"trained {summary['steps']} steps in {summary['seconds']} s; loss "
        f"{num(summary['first_loss'])} → {num(summary['last_loss'])}; "
        f"model in {summary['model_dir']}"
    )
    emit(summary, as_json)


def train_dpo_command(
    config: ConfigOption = None,
    data: DataOption = None,
    output_dir: OutputOption = None,
    model: ModelOption = None,
    max_steps: StepsOption = None,
    weighting: Annotated[
        str | None,
        typer.Option(
            help="column:weight (default: the pairs file's weights), sigmoid (recompute "
            "PersoDPO's from the scores), one (vanilla DPO) or column:NAME."
        ),
    ] = None,
    weight_norm: Annotated[
        str | None, typer.Option(help="none | mean (weights scaled to mean 1: same step size).")
    ] = None,
    resume: ResumeFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Score-weighted DPO (PersoDPO) on a pairs file; LoRA by default."""
    from persona_align.training.dpo import train_dpo

    overrides = {"data": data, "output_dir": output_dir, "model": model, "max_steps": max_steps,
                 "weighting": weighting, "weight_norm": weight_norm}  # fmt: skip
    _report(train_dpo(train_config("dpo", config, overrides), resume=resume), as_json)


def train_sft_command(
    config: ConfigOption = None,
    data: DataOption = None,
    output_dir: OutputOption = None,
    model: ModelOption = None,
    max_steps: StepsOption = None,
    resume: ResumeFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Supervised fine-tuning on prompt-completion examples, loss on the completion only."""
    from persona_align.training.sft import train_sft

    overrides = {"data": data, "output_dir": output_dir, "model": model, "max_steps": max_steps}
    _report(train_sft(train_config("sft", config, overrides), resume=resume), as_json)
