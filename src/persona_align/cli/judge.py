"""``persona-align judge eval`` and ``persona-align train judge``: our C and coherence judges.

Registered by ``cli/app.py``: ``judge_app`` as the ``judge`` group, ``train_judge_command`` as
``train judge``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from persona_align.cli.output import JsonFlag, console, emit
from persona_align.errors import InputError
from persona_align.metrics.base import Unavailable
from persona_align.metrics.coherence import judge_folder
from persona_align.metrics.coherence_judge import CoherenceJudge
from persona_align.metrics.judges import JudgeEvaluation, evaluate_judge, read_judge_items
from persona_align.metrics.nli import PairClassifier

DEFAULT_JUDGES = {"c": "embedded-c-judge", "coh": "embedded-coh-judge"}
NAMES = {1: "uses (1)", 0: "neutral (0)", -1: "contradicts (-1)"}

judge_app = typer.Typer(no_args_is_help=True)


@judge_app.callback()
def judge_group() -> None:
    """Our judges (persona consistency C, coherence): agreement with readers' labels."""


def evaluation_table(title: str, result: JudgeEvaluation, task: str) -> Table:
    """Gold labels down, the judge's across, with per-class precision and recall."""
    names = [NAMES[v] if task == "c" else ("coherent (1)", "not (0)")[1 - v]
             for v in result.values]  # fmt: skip
    table = Table("gold \\ judge", *names, "precision", "recall", title=title,
                  title_justify="left")  # fmt: skip
    per_class = result.per_class()
    for value, name, row in zip(result.values, names, result.confusion, strict=True):
        stats = per_class[str(value)]
        table.add_row(
            name, *(str(n) for n in row),
            "-" if stats["precision"] is None else f"{stats['precision']:.3f}",
            "-" if stats["recall"] is None else f"{stats['recall']:.3f}",
        )  # fmt: skip
    return table


def _task_of(name: str) -> str | None:
    """The task a judge folder declares (None for NLI models and unresolvable names)."""
    try:
        spec = judge_folder(name) / "judge.json"
    except Unavailable:
        return None
    return json.loads(spec.read_text()).get("task") if spec.is_file() else None


@judge_app.command("eval")
def judge_eval(
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL in the dev set's format.")],
    task: Annotated[str, typer.Option(help="c (persona consistency) or coh (coherence).")] = "c",
    model: Annotated[
        str | None,
        typer.Option(help="Judge folder, embedded-c-judge / embedded-coh-judge, or an NLI model."),
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="An LLM judge instead: openai:MODEL@BASE_URL (task c).")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the LLM judge's key.")
    ] = "OPENAI_API_KEY",
    as_json: JsonFlag = False,
) -> None:
    """Accuracy, Cohen's kappa, per-class precision/recall, the confusion matrix and the share
    of false contradictions of a judge against labels made by careful reading."""
    if task not in DEFAULT_JUDGES:
        raise InputError(None, f"--task must be c or coh, got {task!r}")
    if judge is not None and model is not None:
        raise InputError(None, "give --model or --judge, not both")
    items = read_judge_items(data)
    if task == "coh":
        bad = next((n for n, i in enumerate(items, 1) if i.label not in (0, 1)), None)
        if bad is not None:
            raise InputError(data, "coherence labels are 0 or 1", where=f"line {bad}",
                             field="label")  # fmt: skip
    scorer: Any
    if judge is not None:
        from persona_align.metrics.llm_judge import LLMJudge

        scorer = LLMJudge.from_spec(judge, task, api_key_env=api_key_env)
        name = judge
    else:
        name = model or DEFAULT_JUDGES[task]
        if task == "coh" or _task_of(name) == "coh":
            try:
                scorer = CoherenceJudge(judge_folder(name))
            except Unavailable as why:
                raise InputError(None, f"judge {name!r} is unavailable: {why}") from None
        else:
            scorer = PairClassifier(name)
    try:
        scorer.load()
    except Unavailable as why:
        if task == "coh" and isinstance(scorer, CoherenceJudge):
            raise InputError(None, f"{name!r} is not a coh judge: {why}") from None
        raise InputError(None, f"judge {name!r} is unavailable: {why}") from None
    if judge is None and scorer.spec.get("task") != task:
        raise InputError(None, f"{name!r} is not a {task} judge (its judge.json says "
                               f"{scorer.spec.get('task')!r})")  # fmt: skip
    began = time.perf_counter()
    result = evaluate_judge(task, scorer, items)
    by_role = {
        role: evaluate_judge(task, scorer, [i for i in items if i.persona_role == role]).as_dict()
        for role in sorted({i.persona_role for i in items})
    } if task == "c" and len({i.persona_role for i in items}) > 1 else {}  # fmt: skip
    seconds = time.perf_counter() - began
    if not as_json:
        line = (f"{data}: {result.items} items, accuracy {result.accuracy:.3f}, "
                f"kappa {result.kappa:.3f}")  # fmt: skip
        if result.false_contradictions is not None:
            line += f", false contradictions {result.false_contradictions:.1%}"
        if result.unjudged:
            line += f", {result.unjudged} not judged (calls failed)"
        console.print(line + f" ({name})")
        console.print(evaluation_table(f"{name} on {data.name}", result, task))
        for role, found in by_role.items():
            console.print(f"  persona_role={role}: {found['items']} items, accuracy "
                          f"{found['accuracy']:.3f}, kappa {found['kappa']:.3f}")  # fmt: skip
    if as_json:
        summary = {"command": "judge eval", "data": str(data), "task": task, "judge": name}
        summary |= result.as_dict() | {"by_role": by_role, "seconds": round(seconds, 2)}
        emit(summary, True)


def train_judge_command(
    task: Annotated[str, typer.Argument(help="c (persona consistency) or coh (coherence).")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder to write the judge to (replaced).")
    ],
    train: Annotated[
        list[Path] | None,
        typer.Option("--train", help="Labelled JSONL (the dev set's format); repeatable."),
    ] = None,
    dev: Annotated[
        list[Path] | None,
        typer.Option("--dev", help="Labelled JSONL evaluated after training; repeatable."),
    ] = None,
    dnli: Annotated[
        Path | None, typer.Option(help="Dialogue NLI nli-train.txt added to the C judge's data.")
    ] = None,
    dialogues: Annotated[
        list[Path] | None,
        typer.Option(
            "--dialogues", help="Dialogue files (JSONL) for coherence pseudo-negatives; repeatable."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training examples.")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    max_length: Annotated[int, typer.Option(help="Tokens per example; longer are cut.")] = 256,
    bf16: Annotated[
        bool, typer.Option("--bf16/--no-bf16", help="bf16 autocast (AMX CPUs, GPUs).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    init: Annotated[
        str | None,
        typer.Option(help="C: an adapter to continue from (a folder, or embedded-nli)."),
    ] = None,
    labelled_weight: Annotated[
        float,
        typer.Option(help="What a --train item counts against a DNLI pair or pseudo-negative."),
    ] = 1.0,
    layers: Annotated[
        int | None,
        typer.Option(help="C: keep only the encoder's first N layers (a faster judge)."),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="C: a judge to distil: its label distributions are learnt too."),
    ] = None,
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(help="C with --teacher: JSONL replies without labels; repeatable."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train a judge (LoRA over the embedded MiniLM) and report it on the --dev files."""
    from persona_align.data import read_dialogues
    from persona_align.data.nli import read_nli
    from persona_align.training.cross_encoder import FitSettings
    from persona_align.training.judge import TASKS, train_judge

    if task not in TASKS:
        raise InputError(None, f"task must be one of {', '.join(TASKS)}, got {task!r}")
    settings = FitSettings(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                           bf16=bf16, seed=seed, init=init, layers=layers)  # fmt: skip
    result = train_judge(
        task,  # type: ignore[arg-type]
        output,
        train=train or [],
        dev=dev or [],
        dialogues=[d for path in dialogues or [] for d in read_dialogues("jsonl", path)],
        dnli=read_nli(dnli, "dnli") if dnli else [],
        settings=settings,
        labelled_weight=labelled_weight,
        teacher=teacher,
        unlabelled=unlabelled or [],
        progress=None if as_json else console,
    )
    if not as_json:
        console.print(f"Wrote the {task} judge to {output}: {result.examples} examples, "
                      f"{result.steps} steps in {result.seconds:.0f} s")  # fmt: skip
        for name, found in result.dev.items():
            console.print(f"  {name}: accuracy {found['accuracy']:.3f}, "
                          f"kappa {found['kappa']:.3f}")  # fmt: skip
    if as_json:
        summary = {"command": "train judge", "task": task, "output": str(output),
                   "examples": result.examples, "steps": result.steps,
                   "seconds": result.seconds, "dev": result.dev}  # fmt: skip
        emit(summary, True)
