"""``persona-align train pal|sbs``: the PAL and SBS methods end to end, evaluation included.

Mounted by ``cli.py`` as commands of the ``train`` group. Every setting lives in the YAML
``pal:`` or ``sbs:`` section (see ``config.PALConfig``/``config.SBSSection`` and
``configs/pal.yaml``/``configs/sbs.yaml``). ``pal_pipeline``/``sbs_pipeline`` are what the
commands run: the training stages (``training.pal``/``training.sbs``), then, when the section
has ``evaluate:``, the trained model's replies to held-out dialogues, written next to the run
(``eval/candidates.jsonl``) for ``persona-align score``/``bench``. Evaluation lives here, not in
``training``, because it uses the inference package (Select-then-Generate), a later stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from persona_align.commands_train import JsonFlag, ResumeFlag
from persona_align.config import PALConfig, SBSSection, load_config
from persona_align.errors import InputError
from persona_align.files import require_file
from persona_align.generation.base import GenerationParams
from persona_align.records import Candidate, Dialogue, write_records
from persona_align.training.pal import (
    StageLedger,
    decode_params,
    fingerprint,
    label_dialogues,
    load_dialogues,
    train_pal,
    write_summary,
)
from persona_align.training.sbs import train_sbs

console = Console(stderr=True)
ConfigRequired = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config with the method's section.")
]
EVAL_STAGE = "evaluate"


def _eval_ledger(out: Path, upstream: str, *parts: Any) -> StageLedger:
    """The run's ledger with the evaluation stage's fingerprint (tied to the trained model's)."""
    ledger = StageLedger(out, {})
    trained = ledger.stages.get(upstream, {}).get("fingerprint")
    ledger.prints[EVAL_STAGE] = fingerprint(trained, *parts)
    return ledger


def _reply_stats(candidates: list[Candidate]) -> dict[str, Any]:
    latencies = [c.latency_s for c in candidates if c.latency_s is not None]
    valid = sum(c.valid for c in candidates)
    return {
        "replies": len(candidates),
        "valid": valid,
        "failure_ratio": 1 - valid / len(candidates) if candidates else None,
        "mean_latency_s": round(sum(latencies) / len(latencies), 4) if latencies else None,
    }


def evaluate_pal(config: PALConfig, console: Console | None = None) -> tuple[dict[str, Any], bool]:
    """Select-then-Generate with the stage-2 model on the held-out dialogues: (summary, whether
    it ran; False when its outputs already existed for the same model and settings).

    Writes ``eval/labels.jsonl`` (persona labels of the held-out dialogues, for the selection
    accuracy), ``eval/selections.jsonl`` and ``eval/candidates.jsonl``.
    """
    from persona_align.inference.select_generate import (
        Selection,
        select_then_generate,
        selection_accuracy,
    )
    from persona_align.models import load_causal_lm
    from persona_align.preference.pal import PersonaLabel

    section = config.evaluate
    assert section is not None
    out = Path(config.output_dir)
    dialogues, digest = load_dialogues(
        Path(section.dialogues), section.format, section.max_dialogues, "pal.evaluate.dialogues"
    )
    ledger = _eval_ledger(
        out, "stage2", digest, section.model_dump(), config.nli, config.data.model_dump()
    )
    folder = out / "eval"
    files = [folder / "labels.jsonl", folder / "selections.jsonl", folder / "candidates.jsonl"]

    def work() -> dict[str, Any]:
        labels = label_dialogues(dialogues, config.nli, console)
        write_records(files[0], labels.values(), PersonaLabel)
        todo = dialogues
        if section.selection == "gold":  # the oracle setting needs a label for each dialogue
            todo = [d for d in dialogues if d.id in labels]
        model, tokenizer = load_causal_lm(str(out / "stage2" / "model"))
        candidates, selections = select_then_generate(
            todo, model, tokenizer, decode_params(section.decode), selection=section.selection,
            labels=labels, config=config.data, threshold=section.threshold,
            batch_size=section.decode.batch_size, console=console,
        )  # fmt: skip
        write_records(files[1], selections, Selection)
        write_records(files[2], candidates, Candidate)
        result = {"dialogues": len(todo), "selection_mode": section.selection}
        result |= _reply_stats(candidates)
        if section.selection == "predicted":
            result["selection"] = selection_accuracy(selections, labels)
        result["candidates"] = str(files[2])
        return result

    return ledger.run(EVAL_STAGE, files, work), bool(ledger.ran)


def sbs_generate(
    dialogues: list[Dialogue],
    model: Any,
    tokenizer: Any,
    config: SBSSection,
    params: GenerationParams,
    score: float = 1.0,
    batch_size: int = 8,
    name: str = "sbs",
    console: Console | None = None,
) -> list[Candidate]:
    """SBS inference: the SBS prompt asking for ``Score: score``, one Candidate per dialogue."""
    from persona_align.generation.hf import generate_texts
    from persona_align.preference.pal import read_reply
    from persona_align.preference.sbs import sbs_messages
    from persona_align.prompting import messages_hash

    data = config.data
    prompts = [sbs_messages(d, score, data.word_limit, data.system) for d in dialogues]
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, disable=console is None,
    ) as progress:  # fmt: skip
        bar = progress.add_task(f"{name} (Score: {score})", total=len(prompts))
        results = generate_texts(
            model, tokenizer, prompts, params, batch_size, lambda n: progress.advance(bar, n)
        )
    candidates = []
    for dialogue, prompt, result in zip(dialogues, prompts, results, strict=True):
        response = read_reply(result.raw, data.response_format, params)
        candidates.append(
            Candidate(
                dialogue_id=dialogue.id, responder=name, raw=result.raw, response=response,
                valid=response is not None, latency_s=result.latency_s,
                prompt_hash=messages_hash(prompt),
            )
        )  # fmt: skip
    return candidates


def evaluate_sbs(config: SBSSection, console: Console | None = None) -> tuple[dict[str, Any], bool]:
    """The SBS model's replies to the held-out dialogues → ``eval/candidates.jsonl``; returns
    (summary, whether it ran), as ``evaluate_pal``."""
    from persona_align.models import load_causal_lm

    section = config.evaluate
    assert section is not None
    out = Path(config.output_dir)
    dialogues, digest = load_dialogues(
        Path(section.dialogues), section.format, section.max_dialogues, "sbs.evaluate.dialogues"
    )
    ledger = _eval_ledger(out, "train", digest, section.model_dump(), config.data.model_dump())
    target = out / "eval" / "candidates.jsonl"

    def work() -> dict[str, Any]:
        model, tokenizer = load_causal_lm(str(out / "train" / "model"))
        candidates = sbs_generate(
            dialogues, model, tokenizer, config, decode_params(section.decode), section.score,
            section.decode.batch_size, console=console,
        )  # fmt: skip
        write_records(target, candidates, Candidate)
        return (
            {"dialogues": len(dialogues), "score": section.score}
            | _reply_stats(candidates)
            | {"candidates": str(target)}
        )

    return ledger.run(EVAL_STAGE, [target], work), bool(ledger.ran)


def _with_evaluation(
    summary: dict[str, Any], evaluation: tuple[dict[str, Any], bool]
) -> dict[str, Any]:
    result, ran = evaluation
    summary[EVAL_STAGE] = result
    (summary["ran"] if ran else summary["skipped"]).append(EVAL_STAGE)
    write_summary(Path(summary["output_dir"]), summary)
    return summary


def pal_pipeline(
    config: PALConfig, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """PAL training (``training.pal.train_pal``) and, when configured, its evaluation."""
    if config.evaluate is not None:  # a typo here fails now, not after the training
        require_file(config.evaluate.dialogues)
    summary = train_pal(config, resume, console)
    if config.evaluate is None:
        return summary
    return _with_evaluation(summary, evaluate_pal(config, console))


def sbs_pipeline(
    config: SBSSection, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """SBS training (``training.sbs.train_sbs``) and, when configured, its evaluation."""
    if config.evaluate is not None:  # a typo here fails now, not after the training
        require_file(config.evaluate.dialogues)
    summary = train_sbs(config, resume, console)
    if config.evaluate is None:
        return summary
    return _with_evaluation(summary, evaluate_sbs(config, console))


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


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _selection(accuracy: dict[str, Any]) -> str:
    """Pass 1's accuracy next to the majority-class baselines it has to beat."""
    return (
        f"{_num(accuracy['exact_accuracy'])} (always none: "
        f"{_num(accuracy['always_none_exact_accuracy'])}); none vs some "
        f"{_num(accuracy['none_vs_some_accuracy'])} (always {accuracy['majority_class']}: "
        f"{_num(accuracy['majority_none_vs_some_accuracy'])})"
    )


def _loss(stage: dict[str, Any]) -> str:
    return (
        f"{stage.get('steps')} steps, loss {_num(stage.get('first_loss'))} → "
        f"{_num(stage.get('last_loss'))}"
    )


def _report(summary: dict[str, Any], rows: list[tuple[str, Any]], as_json: bool) -> None:
    rows += [
        ("stages run", ", ".join(summary["ran"]) or "-"),
        ("stages skipped", ", ".join(summary["skipped"]) or "-"),
        ("model", summary["model_dir"]),
    ]
    console.print(_table(f"{summary['method']} run in {summary['output_dir']}", rows))
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, sort_keys=True))


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
