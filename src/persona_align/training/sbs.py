"""SBS end to end (Saggar et al., ECAI 2025): score-conditioned SFT data, then SFT.

``train_sbs`` runs two stages over one run folder, each skipped on a rerun when its outputs
exist for the same settings (see ``training.pal.StageLedger``):

- ``augment``: gold replies, their one-noun augmentations and their scores as SFT examples
  with ``Score: s`` in the prompt → ``sft.jsonl``;
- ``train``: SFT on them → ``train/`` (model in ``train/model``).

At inference the model is asked for ``Score: 1.0`` (``sbs_messages(dialogue, score=1.0)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from persona_align.config import SBSSection
from persona_align.errors import InputError
from persona_align.files import check_output_folder
from persona_align.preference.sbs import build_sbs_dataset
from persona_align.records import SFTExample, write_records
from persona_align.training.pal import (
    SUMMARY,
    StageLedger,
    fingerprint,
    load_dialogues,
    stage_config,
    write_summary,
)


def train_sbs(
    config: SBSSection, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Build the SBS data and fine-tune on it; returns the run summary (also ``summary.json``).

    ``summary["augment"]`` holds the augmentation counts (nouns found and replaced, fills
    skipped, scores capped, examples), ``summary["train"]`` the trainer's summary.
    """
    from persona_align.training.sft import train_sft  # torch, TRL: only when training

    dialogues, digest = load_dialogues(
        Path(config.dialogues), config.format, config.max_dialogues, "sbs.dialogues"
    )
    out = check_output_folder(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prints = {"augment": fingerprint(digest, config.format, config.max_dialogues,
                                     config.data.model_dump())}  # fmt: skip
    prints["train"] = fingerprint(prints["augment"], config.model, config.train.model_dump())
    ledger = StageLedger(out, prints)
    ledger.check_trainer("train")
    data_path = out / "sft.jsonl"
    train_dir = out / "train"

    def augment() -> dict[str, Any]:
        examples, info = build_sbs_dataset(dialogues, config.data, console=console)
        if not examples:
            raise InputError(config.dialogues, "no SBS examples: no dialogue has a gold reply")
        write_records(data_path, examples, SFTExample)
        return info

    summary: dict[str, Any] = {"method": "sbs", "output_dir": str(out), "dialogues": len(dialogues)}
    summary["augment"] = ledger.run("augment", [data_path], augment)
    train = stage_config(config.train, "sft", config.model, data_path, train_dir)
    summary["train"] = ledger.run(
        "train", [train_dir / SUMMARY, train_dir / "model"], lambda: train_sft(train, resume=resume)
    )
    summary |= {"ran": ledger.ran, "skipped": ledger.skipped, "model_dir": str(train_dir / "model")}
    write_summary(out, summary)
    return summary
