"""PAL end to end (Li et al., arXiv 2511.10215): the two training stages over one run folder.

``train_pal`` runs, in order, each stage skipped when its outputs already exist for the same
settings (a rerun continues where a crash stopped):

- ``labels``: which persona sentence each gold turn uses (dataset grounding, else NLI)
  → ``labels.jsonl``;
- ``sft``: the stage-1 mixed-task examples → ``sft.jsonl``;
- ``stage1``: SFT on them → ``stage1/`` (a trainer run folder, model in ``stage1/model``);
- ``rejected``: the stage-1 model's replies to the no-persona prompt → ``rejected.jsonl``
  (generation is cached in ``cache.sqlite``, so an interrupted pass resumes);
- ``pairs``: chosen = gold, rejected = those replies → ``pairs.jsonl``;
- ``stage2``: DPO on the pairs → ``stage2/``.

Stage 2 trains with ``model = <run>/stage1/model``. ``load_causal_lm`` loads that adapter over
its base and merges it, so the stage-1 model becomes the plain base of stage 2: a fresh LoRA is
trained on top of it, and TRL's reference (the same network with the adapter disabled) is
exactly the stage-1 model, as PAL prescribes. With ``finetune: full`` the reference log-probs
come from the loaded model before its first step, or from a frozen copy of it
(``training.dpo.reference_copy``; TRL alone would rebuild the reference from the merged model's
``_name_or_path``, the original base): the stage-1 model again. ``stage2/model`` records
``stage1/model`` as its base, so it loads as base + stage-1 + stage-2 (keep the run folder
together).

``manifest.json`` records, per stage, a fingerprint of everything that determines its output
(inputs' content, settings, upstream fingerprints). A file stage whose fingerprint changed is
redone; a trainer stage that was started with other settings is refused, since its folder holds
that run's checkpoints and log.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona_align.config import PALConfig, TrainConfig
from persona_align.data import read_dialogues
from persona_align.errors import InputError
from persona_align.files import check_output_folder
from persona_align.generation.base import GenerationParams
from persona_align.generation.cache import GenerationCache
from persona_align.preference.pal import (
    PersonaLabel,
    build_pal_pairs,
    build_pal_sft,
    generate_rejected,
    label_personas,
)
from persona_align.records import (
    Candidate,
    Dialogue,
    PreferencePair,
    SFTExample,
    atomic_open,
    read_records,
    write_records,
)

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able settings (paths as strings)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Content hash of an input file, so an edited dataset invalidates what was built from it."""
    if not path.is_file():
        raise InputError(path, "file does not exist")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class StageLedger:
    """``manifest.json`` of a run folder: each stage's fingerprint, whether it finished, and its
    summary, rewritten atomically after every change.

    ``prints`` maps each stage to the fingerprint of what it would be built from now; ``ran``
    and ``skipped`` list the stages of this invocation.
    """

    def __init__(self, folder: Path, prints: Mapping[str, str]) -> None:
        self.folder = folder
        self.prints = dict(prints)
        self.path = folder / MANIFEST
        self.stages: dict[str, dict[str, Any]] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []
        if self.path.exists():
            try:
                self.stages = json.loads(self.path.read_text(encoding="utf-8"))["stages"]
            except (ValueError, KeyError, TypeError):
                raise InputError(self.path, "not a run manifest; pick another output_dir") from None

    def _write(self) -> None:
        with atomic_open(self.path) as handle:
            json.dump({"stages": self.stages}, handle, indent=2, sort_keys=True)

    def check_trainer(self, name: str) -> None:
        """Refuse to train into a stage folder that another configuration started."""
        entry = self.stages.get(name)
        folder = self.folder / name
        if entry and entry["fingerprint"] != self.prints[name] and folder.exists():
            raise InputError(
                folder,
                f"stage {name!r} was trained with other settings or inputs; pick another "
                "output_dir, or delete this folder (and what follows it) to retrain",
            )

    def run(
        self, name: str, outputs: list[Path], work: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The stage's summary: the recorded one when it finished with the same fingerprint and
        its outputs exist, else what ``work()`` returns (recorded once it has finished), with
        the stage's wall-clock ``seconds`` unless the work reported its own."""
        entry = self.stages.get(name)
        print_ = self.prints[name]
        finished = entry and entry["fingerprint"] == print_ and entry.get("done")
        if finished and all(p.exists() for p in outputs):
            self.skipped.append(name)
            return dict(entry["summary"])
        self.stages[name] = {"fingerprint": print_, "done": False, "summary": {}}
        self._write()
        began = time.perf_counter()
        result = dict(work())
        result.setdefault("seconds", round(time.perf_counter() - began, 1))
        self.stages[name] = {"fingerprint": print_, "done": True, "summary": dict(result)}
        self._write()
        self.ran.append(name)
        return result


def stage_config(
    settings: Any, method: str, model: str, data: Path, output_dir: Path
) -> TrainConfig:
    """A full trainer config from a method's stage section."""
    return TrainConfig.model_validate(
        {**settings.model_dump(), "method": method, "model": model, "data": data,
         "output_dir": output_dir}
    )  # fmt: skip


def load_dialogues(
    path: Path, fmt: str, limit: int | None, field: str
) -> tuple[list[Dialogue], str]:
    """The dialogues of a method section (the first ``limit``) and the file's content hash."""
    dialogues = read_dialogues(fmt, path)[:limit]
    if not dialogues:
        raise InputError(path, "no dialogues", field=field)
    return dialogues, file_digest(path)


def _nli_scorer(name: str, console: Console | None) -> Callable[..., Any]:
    """The NLI model's batched probabilities with a progress bar; Unavailable → InputError."""
    from persona_align.metrics.base import Unavailable
    from persona_align.metrics.nli import NLIModel

    model = NLIModel(name)
    try:
        model.load()
    except Unavailable as err:
        message = f"persona labels need an NLI model: {err}"
        raise InputError(None, message, field="pal.nli") from None

    def score(pairs: Any) -> Any:
        with _progress(console) as progress:
            bar = progress.add_task("persona labels (NLI)", total=len(set(pairs)))
            return model.probabilities(pairs, lambda n: progress.advance(bar, n))

    return score


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, disable=console is None,
    )  # fmt: skip


def label_dialogues(
    dialogues: list[Dialogue], nli: str, console: Console | None = None
) -> dict[str, PersonaLabel]:
    """``label_personas`` with the named NLI model, loaded only when some dialogue needs it."""
    needs = any(d.persona_grounding is None and (d.reference or "").strip() for d in dialogues)
    scorer = _nli_scorer(nli, console) if needs else None
    return label_personas(dialogues, scorer)


def decode_params(decode: Any) -> GenerationParams:
    """Generation parameters from a config's ``DecodeSection``."""
    return GenerationParams(
        max_new_tokens=decode.max_new_tokens,
        temperature=decode.temperature,
        top_p=decode.top_p,
        seed=decode.seed,
    )


def train_pal(
    config: PALConfig, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run PAL's training stages into ``config.output_dir``; returns the run summary.

    ``resume`` is passed to the trainers (continue a stage from its last checkpoint). The
    summary has one entry per stage (its counts, or the trainer's summary) and which stages
    ran or were skipped; it is also written to ``summary.json``.
    """
    from persona_align.training.dpo import train_dpo  # torch, TRL: only when training
    from persona_align.training.sft import train_sft

    dialogues, digest = load_dialogues(
        Path(config.dialogues), config.format, config.max_dialogues, "pal.dialogues"
    )
    out = check_output_folder(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = config.data
    prints: dict[str, str] = {}
    prints["labels"] = fingerprint(digest, config.format, config.max_dialogues, config.nli)
    prints["sft"] = fingerprint(prints["labels"], data.model_dump())
    prints["stage1"] = fingerprint(prints["sft"], config.model, config.stage1.model_dump())
    prints["rejected"] = fingerprint(prints["stage1"], config.rejected.model_dump())
    prints["pairs"] = fingerprint(prints["rejected"])
    prints["stage2"] = fingerprint(prints["pairs"], config.stage2.model_dump())
    ledger = StageLedger(out, prints)
    for name in ("stage1", "stage2"):
        ledger.check_trainer(name)

    paths = {
        "labels": out / "labels.jsonl",
        "sft": out / "sft.jsonl",
        "rejected": out / "rejected.jsonl",
        "pairs": out / "pairs.jsonl",
    }
    summary: dict[str, Any] = {"method": "pal", "output_dir": str(out), "dialogues": len(dialogues)}

    labels: dict[str, PersonaLabel] = {}

    def make_labels() -> dict[str, Any]:
        labels.update(label_dialogues(dialogues, config.nli, console))
        write_records(paths["labels"], labels.values(), PersonaLabel)
        sources = [label.source for label in labels.values()]
        return {
            "labelled": len(labels),
            "grounding": sources.count("grounding"),
            "nli": sources.count("nli"),
            "none": sum(1 for label in labels.values() if not label.indices),
            "unlabelled": len(dialogues) - len(labels),
        }

    summary["labels"] = ledger.run("labels", [paths["labels"]], make_labels)
    if not labels:
        labels = {lab.dialogue_id: lab for lab in read_records(paths["labels"], PersonaLabel)}

    def make_sft() -> dict[str, Any]:
        examples, info = build_pal_sft(dialogues, labels, data)
        if not examples:
            raise InputError(
                config.dialogues, "no stage-1 examples: no dialogue has a gold reply and a label"
            )
        write_records(paths["sft"], examples, SFTExample)
        return {k: v for k, v in info.items() if k != "dialogues"}

    summary["sft"] = ledger.run("sft", [paths["sft"]], make_sft)

    stage1 = stage_config(config.stage1, "sft", config.model, paths["sft"], out / "stage1")
    summary["stage1"] = ledger.run(
        "stage1",
        [out / "stage1" / SUMMARY, out / "stage1" / "model"],
        lambda: train_sft(stage1, resume=resume),
    )
    stage1_model = out / "stage1" / "model"

    def make_rejected() -> dict[str, Any]:
        from persona_align.generation.hf import HFResponder

        usable = [d for d in dialogues if d.id in labels and (d.reference or "").strip()]
        responder = HFResponder(
            model=str(stage1_model), batch_size=config.rejected.batch_size, name="pal-stage1"
        )
        with GenerationCache(out / "cache.sqlite") as cache:
            candidates = generate_rejected(
                usable, responder, decode_params(config.rejected), data, cache, console
            )
        write_records(paths["rejected"], candidates, Candidate)
        valid = sum(c.valid for c in candidates)
        return {"replies": len(candidates), "valid": valid, "failed": len(candidates) - valid}

    summary["rejected"] = ledger.run("rejected", [paths["rejected"]], make_rejected)

    def make_pairs() -> dict[str, Any]:
        candidates = read_records(paths["rejected"], Candidate)
        pairs, info = build_pal_pairs(dialogues, candidates, labels, data)
        if not pairs:
            hint = ""
            if data.response_format == "json" and info["dropped"].get("failed"):
                hint = "; the stage-1 model wrote no valid JSON reply (train stage 1 longer?)"
            raise InputError(
                paths["rejected"],
                f"no stage-2 pairs: every stage-1 reply was dropped ({info['dropped']}){hint}",
            )
        write_records(paths["pairs"], pairs, PreferencePair)
        return info

    summary["pairs"] = ledger.run("pairs", [paths["pairs"]], make_pairs)

    stage2 = stage_config(config.stage2, "dpo", str(stage1_model), paths["pairs"], out / "stage2")
    summary["stage2"] = ledger.run(
        "stage2",
        [out / "stage2" / SUMMARY, out / "stage2" / "model"],
        lambda: train_dpo(stage2, resume=resume),
    )
    summary |= {"ran": ledger.ran, "skipped": ledger.skipped}
    summary["model_dir"] = str(out / "stage2" / "model")
    write_summary(out, summary)
    return summary


def write_summary(folder: Path, summary: Mapping[str, Any]) -> None:
    with atomic_open(folder / SUMMARY) as handle:
        json.dump(summary, handle, indent=2, sort_keys=True, ensure_ascii=False)
