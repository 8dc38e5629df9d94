"""PAL and SBS end to end: their training stages, then, when the section has ``evaluate:``,
the trained model's replies to held-out dialogues, written next to the run
(``eval/candidates.jsonl``) for ``persona-align score``/``bench``.

Every setting lives in the YAML ``pal:`` or ``sbs:`` section (``config.PALConfig``,
``config.SBSSection``; ``configs/pal.yaml``, ``configs/sbs.yaml``). ``pal_pipeline`` and
``sbs_pipeline`` are what ``persona-align train pal|sbs`` and ``run`` call. Evaluation lives
here, not in ``training``, because it uses the inference package (Select-then-Generate), a
later stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona_align.config import PALConfig, SBSSection
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


def _train_then_evaluate(
    config: Any, train: Any, evaluate: Any, resume: bool, console: Console | None
) -> dict[str, Any]:
    """The method's training stages, then, when configured, its evaluation (recorded in the
    run's summary as one more stage, run or skipped)."""
    if config.evaluate is not None:  # a typo here fails now, not after the training
        require_file(config.evaluate.dialogues)
    summary = train(config, resume, console)
    if config.evaluate is None:
        return summary
    result, ran = evaluate(config, console)
    summary[EVAL_STAGE] = result
    (summary["ran"] if ran else summary["skipped"]).append(EVAL_STAGE)
    write_summary(Path(summary["output_dir"]), summary)
    return summary


def pal_pipeline(
    config: PALConfig, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """PAL training (``training.pal.train_pal``) and, when configured, its evaluation."""
    return _train_then_evaluate(config, train_pal, evaluate_pal, resume, console)


def sbs_pipeline(
    config: SBSSection, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """SBS training (``training.sbs.train_sbs``) and, when configured, its evaluation."""
    return _train_then_evaluate(config, train_sbs, evaluate_sbs, resume, console)
