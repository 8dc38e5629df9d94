"""`persona-align train pal|sbs`: the PAL and SBS methods end to end (``methods``), evaluation
included, with a table of what each stage did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from persona_align.cli.output import JsonFlag, ResumeFlag, emit, err_console, num
from persona_align.config import load_config
from persona_align.errors import InputError
from persona_align.methods import EVAL_STAGE, pal_pipeline, sbs_pipeline

console = err_console
ConfigRequired = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config with the method's section.")
]


def _section(config: Path, name: str) -> Any:
    section = getattr(load_config(config), name)
    if section is None:
        raise InputError(config, f"has no `{name}:` section", field=name)
    return section


def _table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        if isinstance(value, dict):  # counts; the stage's seconds are in the JSON summary
            value = ", ".join(f"{k}: {v}" for k, v in value.items() if k != "seconds") or "-"
        table.add_row(key, str(value))
    return table


def _selection(accuracy: dict[str, Any]) -> str:
    """Pass 1's accuracy next to the majority-class baselines it has to beat."""
    return (
        f"{num(accuracy['exact_accuracy'])} (always none: "
        f"{num(accuracy['always_none_exact_accuracy'])}); none vs some "
        f"{num(accuracy['none_vs_some_accuracy'])} (always {accuracy['majority_class']}: "
        f"{num(accuracy['majority_none_vs_some_accuracy'])})"
    )


def _loss(stage: dict[str, Any]) -> str:
    return (
        f"{stage.get('steps')} steps, loss {num(stage.get('first_loss'))} → "
        f"{num(stage.get('last_loss'))}"
    )


def _report(summary: dict[str, Any], rows: list[tuple[str, Any]], as_json: bool) -> None:
    rows += [
        ("stages run", ", ".join(summary["ran"]) or "-"),
        ("stages skipped", ", ".join(summary["skipped"]) or "-"),
        ("model", summary["model_dir"]),
    ]
    console.print(_table(f"{summary['method']} run in {summary['output_dir']}", rows))
    emit(summary, as_json)


def train_pal_command(
    config: ConfigRequired, resume: ResumeFlag = False, as_json: JsonFlag = False
) -> None:
    """PAL: persona-aware mixed-task SFT, then DPO against the stage-1 model's own replies.

    Stage 2's rejected replies are the stage-1 model's answers without persona, its reference
    model the stage-1 model. With `evaluate:` in the config, the trained model answers held-out
    dialogues with Select-then-Generate. A rerun skips the stages that are done.
    """
    summary = pal_pipeline(_section(config, "pal"), resume, console)
    rows: list[tuple[str, Any]] = [
        ("persona labels", summary["labels"]),
        ("stage-1 examples", summary["sft"]["examples"]),
        ("stage-1 skipped", {t: n for t, n in summary["sft"]["skipped"].items() if n}),
        ("stage 1", _loss(summary["stage1"])),
        ("stage-1 replies", summary["rejected"]),
        ("pairs", summary["pairs"]["pairs"]),
        ("pairs dropped", summary["pairs"]["dropped"]),
        ("stage 2", _loss(summary["stage2"])),
    ]
    evaluation = summary.get(EVAL_STAGE)
    if evaluation:
        rows.append(("held-out replies", {k: evaluation[k] for k in ("replies", "valid")}))
        if "selection" in evaluation:
            rows.append(("selection accuracy", _selection(evaluation["selection"])))
    _report(summary, rows, as_json)


def train_sbs_command(
    config: ConfigRequired, resume: ResumeFlag = False, as_json: JsonFlag = False
) -> None:
    """SBS: score-conditioned SFT on gold replies and their one-noun augmentations.

    Each augmented reply is scored by its similarity to the gold one, and every prompt ends
    with `Score: s`. With `evaluate:` in the config, the trained model answers held-out
    dialogues asked for `Score: 1.0`. A rerun skips the stages that are done.
    """
    summary = sbs_pipeline(_section(config, "sbs"), resume, console)
    augment = summary["augment"]
    rows: list[tuple[str, Any]] = [
        ("responses", augment["responses"]),
        ("nouns found / replaced", f"{augment['nouns_found']} / {augment['nouns_masked']}"),
        ("augmentations", augment["augmentations"]),
        ("examples", augment["examples"]),
        ("score mean", augment["score_mean"]),
        ("training", _loss(summary["train"])),
    ]
    evaluation = summary.get(EVAL_STAGE)
    if evaluation:
        rows.append(("held-out replies", {k: evaluation[k] for k in ("replies", "valid")}))
    _report(summary, rows, as_json)
