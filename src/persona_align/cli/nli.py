"""``persona-align nli eval`` and ``persona-align train nli``: the NLI model behind C and UE.

Registered by ``cli/app.py``: ``nli_app`` as the ``nli`` group, ``train_nli_command`` as
``train nli``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from persona_align.cli.output import JsonFlag, console, emit
from persona_align.data.nli import FORMATS, LABELS, read_nli
from persona_align.errors import InputError
from persona_align.metrics.base import Unavailable
from persona_align.metrics.nli import EMBEDDED_NLI, NLI_DTYPES, NLIModel, evaluate_nli

nli_app = typer.Typer(no_args_is_help=True)


@nli_app.callback()
def nli_group() -> None:
    """The NLI model behind the C and UE metrics: check its accuracy on labelled pairs."""
    # A callback keeps `nli` a group even with one command, so `nli eval` stays `nli eval`.


def confusion_table(title: str, confusion: list[list[int]]) -> Table:
    """Gold labels down, predictions across."""
    table = Table("gold \\ predicted", *LABELS, "recall", title=title, title_justify="left")
    for label, row in zip(LABELS, confusion, strict=True):
        recall = row[LABELS.index(label)] / sum(row) if sum(row) else 0.0
        table.add_row(label, *(str(n) for n in row), f"{recall:.3f}")
    return table


@nli_app.command("eval")
def nli_eval(
    data: Annotated[
        Path, typer.Option("--data", help="Labelled NLI file (an MNLI-hard folder for mnli-hard).")
    ],
    format: Annotated[
        str | None,
        typer.Option("--format", "-f", help=f"One of {', '.join(FORMATS)}; guessed when left out."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="NLI model: embedded-nli, a local folder or a hub id.")
    ] = EMBEDDED_NLI,
    dtype: Annotated[
        str, typer.Option(help=f"One of {', '.join(NLI_DTYPES)} (auto: the device's default).")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 64,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N pairs.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Accuracy and 3x3 confusion matrix of an NLI model on a labelled set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if limit is not None and limit < 1:
        raise InputError(None, f"--limit must be positive, got {limit}")
    pairs = read_nli(data, format)[:limit]
    nli = NLIModel(model, dtype=dtype, batch_size=batch_size)
    try:
        nli.load()
    except Unavailable as why:
        raise InputError(None, f"--model {model!r} is unavailable: {why}") from None
    began = time.perf_counter()
    with Progress(
        TextColumn("[bold]nli eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=as_json,
    ) as progress:  # fmt: skip
        task = progress.add_task("eval", total=len(set((p.premise, p.hypothesis) for p in pairs)))
        result = evaluate_nli(nli, pairs, lambda n: progress.advance(task, n))
    seconds = time.perf_counter() - began
    if not as_json:
        console.print(f"{data}: {result.pairs} pairs, accuracy {result.accuracy:.4f} ({model})")
        console.print(confusion_table(f"{model} on {data.name}", result.confusion))
    summary = {"command": "nli eval", "data": str(data), "model": model, "dtype": dtype}
    emit(summary | result.as_dict() | {"seconds": round(seconds, 2)}, as_json)


def train_nli_command(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder to write the adapter to (replaced).")
    ],
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            help="Folder holding DNLI nli-train/nli-valid.txt, MNLI-hard folders and SNLI-hard.",
        ),
    ],
    base: Annotated[
        str, typer.Option(help="Encoder to adapt: embedded-minilm, a folder or a hub id.")
    ] = "embedded-minilm",
    epochs: Annotated[int, typer.Option(help="Passes over the training pairs.")] = 2,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (linear warm-up and decay).")
    ] = 1e-3,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 32,
    max_length: Annotated[int, typer.Option(help="Tokens per pair; longer pairs are cut.")] = 128,
    train_norms: Annotated[
        bool, typer.Option("--train-norms/--no-train-norms", help="Also train LayerNorms, biases.")
    ] = True,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 autocast: faster only where bf16 matmuls are native (AMX, GPUs).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, dropout and order.")] = 0,
    max_pairs: Annotated[
        int | None, typer.Option(help="Train on a seeded sample of N pairs.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune the NLI cross-encoder (LoRA) and report held-out DNLI accuracy."""
    from persona_align.training.nli import train_nli

    result = train_nli(
        output, data_dir=data_dir, base=base, epochs=epochs, lr=lr, lora_r=lora_r,
        batch_size=batch_size, max_length=max_length, train_norms=train_norms, bf16=bf16,
        seed=seed, max_pairs=max_pairs, progress=None if as_json else console,
    )  # fmt: skip
    if not as_json:
        console.print(
            f"Wrote the adapter to {output}: {result.train_pairs} training pairs, "
            f"{result.steps} steps in {result.seconds:.0f} s"
        )
        if result.valid:
            console.print(f"DNLI valid accuracy {result.valid['accuracy']:.4f}")
            matrix = result.valid["confusion"]["gold_by_predicted"]
            console.print(confusion_table(f"held-out DNLI valid ({result.valid_pairs})", matrix))
    summary = {"command": "train nli", "output": str(output), "base": base,
               "train_pairs": result.train_pairs, "valid_pairs": result.valid_pairs,
               "steps": result.steps, "seconds": result.seconds, "valid": result.valid}  # fmt: skip
    emit(summary, as_json)
