"""PAL and SBS against the base model on FoCus: persona consistency, overlap, diversity.

Both methods train the embedded SmolLM2-135M-Instruct on dialogues of PersoDPO's FoCus prompts
(``prompts/train.csv``) and answer held-out dialogues of ``prompts/valid.csv`` (the first
``--eval-n``): PAL with Select-then-Generate, SBS with ``Score: 1.0`` in the prompt. The base
model answers the same dialogues with the PersoBench prompt. Reported per system: C (the C
judge, ``c``'s default; failures -1), BLEU-1, ROUGE-L, Dist-1/2 (per reply and over the corpus),
failure ratio, with bootstrap 95% intervals, and each method's paired difference from the base
model (bootstrap interval, sign-flip p-value). Persona selection accuracy: PAL's pass 1 against
the base model's answer to the same select prompt and against always answering none (the
majority-class baseline a collapsed select task scores), all scored against persona labels that
come from NLI (FoCus's CSV carries no persona grounding, so ``label_personas`` falls back to NLI).

Every stage is resumable: rerunning the same command continues where it stopped. ``--quick``
runs a handful of dialogues with 2 training steps per stage and prints what the full run would
take, extrapolated from the quick run's per-unit timings.

    .venv/bin/python benchmarks/pal_sbs_outcome.py --quick
    .venv/bin/python benchmarks/pal_sbs_outcome.py [--train-n 1500] [--eval-n 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from persona_align.config import (
    DecodeSection,
    PALConfig,
    PALEvalSection,
    SBSEvalSection,
    SBSSection,
    TrainerSettings,
)
from persona_align.data import read_dialogues
from persona_align.generation import GenerationCache, GenerationParams, make_responder
from persona_align.generation.runner import run_responder
from persona_align.inference.select_generate import RESPONDER_NAME, Selection
from persona_align.methods import pal_pipeline, sbs_pipeline
from persona_align.metrics import make_metric
from persona_align.metrics.aggregate import paired_test, summarize
from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
from persona_align.preference.pal import PALDataConfig, PersonaLabel
from persona_align.preference.sbs import SBSConfig
from persona_align.records import Candidate, Dialogue, read_records, write_records

ROOT = Path(__file__).resolve().parents[1]
FOCUS = ROOT.parent / "shared" / "data" / "persodpo-focus" / "prompts"
METRICS = ["c", "bleu-1", "rouge-l", "dist-1", "dist-2"]
EVAL_ROWS = {"pal Select-then-Generate", "sbs replies", "base replies", "base select pass",
             "scoring (3 systems)"}  # fmt: skip
FULL_TRAIN = 1500  # rows of prompts/train.csv
FULL_EVAL = 200
console = Console(stderr=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 train / 4 eval dialogues, 2 steps")
    parser.add_argument("--train-n", type=int, default=FULL_TRAIN)
    parser.add_argument("--eval-n", type=int, default=FULL_EVAL)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="per trainer stage; -1 = epochs")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per optimiser step")
    parser.add_argument("--max-length", type=int, default=1536, help="FoCus prompts are long")
    parser.add_argument("--max-new-tokens", type=int, default=110, help="PersoBench: 110")
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument("--sbs-max-augmentations", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="default: runs/pal-sbs-outcome")
    args = parser.parse_args()
    if args.quick:
        args.train_n, args.eval_n, args.max_steps = 6, 4, 2
    args.work = args.work or ROOT / "runs" / f"pal-sbs-outcome{'-quick' if args.quick else ''}"
    return args


def prepare_data(args: argparse.Namespace) -> tuple[Path, Path, list[Dialogue]]:
    """The FoCus subsets as Dialogue JSONL in the work folder (the methods' input files)."""
    if not FOCUS.is_dir():
        sys.exit(f"{FOCUS} is absent")
    args.work.mkdir(parents=True, exist_ok=True)
    train = read_dialogues("persobench-csv", FOCUS / "train.csv")[: args.train_n]
    held_out = read_dialogues("persobench-csv", FOCUS / "valid.csv")[: args.eval_n]
    assert not any(d.persona_grounding for d in train), "FoCus CSV labels would skip NLI"
    paths = args.work / "train.jsonl", args.work / "valid.jsonl"
    for path, dialogues in zip(paths, (train, held_out), strict=True):
        write_records(path, dialogues, Dialogue)
    return paths[0], paths[1], held_out


def trainer(args: argparse.Namespace, **extra: Any) -> Any:
    return TrainerSettings(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length, save_steps=100, **extra,
    )  # fmt: skip


def decode(args: argparse.Namespace) -> DecodeSection:
    return DecodeSection(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size)


def run_pal(args: argparse.Namespace, train: Path, valid: Path) -> dict[str, Any]:
    config = PALConfig(
        dialogues=train, output_dir=args.work / "pal", data=PALDataConfig(),
        stage1=trainer(args), rejected=decode(args), stage2=trainer(args, weighting="one"),
        evaluate=PALEvalSection(dialogues=valid, decode=decode(args)),
    )  # fmt: skip
    return pal_pipeline(config, resume=True, console=console)


def run_sbs(args: argparse.Namespace, train: Path, valid: Path) -> dict[str, Any]:
    config = SBSSection(
        dialogues=train, output_dir=args.work / "sbs",
        data=SBSConfig(max_augmentations=args.sbs_max_augmentations),
        train=trainer(args), evaluate=SBSEvalSection(dialogues=valid, decode=decode(args)),
    )  # fmt: skip
    return sbs_pipeline(config, resume=True, console=console)


class Timings:
    """Seconds per component, kept in the work folder: a rerun served from caches reports the
    time the work took when it was done, not the cache lookup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, name: str, seconds: float, cached: bool) -> float:
        if not (cached and name in self.values):
            self.values[name] = round(seconds, 1)
            self.path.write_text(json.dumps(self.values, indent=2))
        return self.values[name]


def run_base(
    args: argparse.Namespace, held_out: list[Dialogue], timings: Timings
) -> list[Candidate]:
    """The untrained model's PersoBench replies (cached, so a rerun is free)."""
    responder = make_responder("hf", model="embedded", batch_size=args.gen_batch_size)
    target = args.work / "base-candidates.jsonl"
    cached = target.exists()
    began = time.perf_counter()
    with GenerationCache(args.work / "base-cache.sqlite") as cache:
        candidates = run_responder(
            held_out,
            responder,
            GenerationParams(max_new_tokens=args.max_new_tokens),
            cache,
            console=console,
        )
    write_records(target, candidates, Candidate)
    timings.record("base replies", time.perf_counter() - began, cached)
    return candidates


def base_selection(
    args: argparse.Namespace,
    held_out: list[Dialogue],
    labels: dict[str, PersonaLabel],
    timings: Timings,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The base model's answer to PAL's select prompt, scored like PAL's pass 1."""
    from persona_align.inference import select_generate as stg
    from persona_align.models import load_causal_lm
    from persona_align.preference.pal import select_messages

    target = args.work / "base-selections.jsonl"
    cached = target.exists()
    began = time.perf_counter()
    if cached:
        selections = read_records(target, stg.Selection)
    else:
        model, tokenizer = load_causal_lm("embedded")
        params = replace(
            GenerationParams(), max_new_tokens=stg.SELECT_MAX_NEW_TOKENS, temperature=0.0
        )
        results = stg.generate_texts(
            model, tokenizer, [select_messages(d) for d in held_out], params, args.gen_batch_size
        )
        selections = []
        for dialogue, result in zip(held_out, results, strict=True):
            index, method = stg.match_persona(result.raw, dialogue.persona)
            selected = dialogue.persona[index] if index is not None else None
            selections.append(
                stg.Selection(dialogue_id=dialogue.id, raw=result.raw, index=index,
                              selected=selected, method=method)
            )  # fmt: skip
        write_records(target, selections, stg.Selection)
    timings.record("base select pass", time.perf_counter() - began, cached)
    return stg.selection_accuracy(selections, labels), hits(selections, labels)


def hits(selections: list[Any], labels: dict[str, PersonaLabel]) -> dict[str, float]:
    """Per dialogue, 1 when the selected sentence is one the gold turn uses (or both say none)."""
    out = {}
    for s in selections:
        label = labels.get(s.dialogue_id)
        if label is not None:
            good = s.index in label.indices if s.index is not None else not label.indices
            out[s.dialogue_id] = float(good)
    return out


def score(
    args: argparse.Namespace,
    held_out: list[Dialogue],
    candidates: list[Candidate],
    timings: Timings,
) -> tuple[list[Any], dict[str, Any]]:
    metrics = [make_metric(m) for m in METRICS]
    cached = (args.work / "scores.sqlite").exists()
    began = time.perf_counter()
    statuses = prepare_metrics(metrics, held_out)
    cache = ScoreCache(args.work / "scores.sqlite")
    try:
        scored = list(
            score_stream({d.id: d for d in held_out}, candidates, metrics, statuses, cache)
        )
    finally:
        cache.close()
    unavailable = {s.name: s.reason for s in statuses if not s.available}
    timings.record("scoring (3 systems)", time.perf_counter() - began, cached)
    return scored, unavailable


def per_dialogue(scored: list[Any], responder: str, metric: str) -> dict[str, float]:
    return {
        c.dialogue_id: c.scores[metric]
        for c in scored
        if c.responder == responder and c.scores.get(metric) is not None
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def report(
    systems: dict[str, str],
    summary: dict[str, Any],
    scored: list[Any],
    unavailable: dict[str, str],
    selection: dict[str, Any],
) -> dict[str, Any]:
    """Print the Markdown tables; return everything as JSON-able results."""
    names = list(systems)
    print("\n| system | replies | failure ratio | " + " | ".join(METRICS) + " |")
    print("|---" * (3 + len(METRICS)) + "|")
    for label, responder in systems.items():
        entry = summary[responder]
        cells = []
        for m in METRICS:
            value = entry["metrics"].get(m)
            cells.append(
                "unavailable" if m in unavailable else "-" if value is None else
                f"{fmt(value['mean'])} [{fmt(value['ci95'][0])}, {fmt(value['ci95'][1])}]"
            )  # fmt: skip
        print(f"| {label} | {entry['responses']} | {fmt(entry['failure_ratio'])} | "
              + " | ".join(cells) + " |")  # fmt: skip
    print("\ncorpus Dist-1/2 (all valid replies of a system):")
    for label, responder in systems.items():
        corpus = summary[responder].get("corpus", {})
        print(f"  {label}: {fmt(corpus.get('dist-1'))} / {fmt(corpus.get('dist-2'))}")

    paired: dict[str, dict[str, Any]] = {}
    base = systems[names[0]]
    print(f"\nPaired difference from {names[0]} (mean, bootstrap 95% CI, sign-flip p):")
    print("| metric | " + " | ".join(f"{n} - {names[0]}" for n in names[1:]) + " |")
    print("|---" * len(names) + "|")
    for m in METRICS:
        if m in unavailable:
            continue
        cells = []
        for label in names[1:]:
            a = per_dialogue(scored, systems[label], m)
            b = per_dialogue(scored, base, m)
            test = paired_test(a, b)
            paired.setdefault(label, {})[m] = test
            cells.append(f"{fmt(test['mean_diff'])} [{fmt(test['ci95_low'])}, "
                         f"{fmt(test['ci95_high'])}] p={fmt(test['p_value'], 4)}")  # fmt: skip
        print(f"| {m} | " + " | ".join(cells) + " |")

    print("\nPersona selection accuracy (PAL's select prompt; labels from NLI):")
    for label in ("base", "pal"):
        acc = selection[label]
        print(f"  {label}: exact {fmt(acc['exact_accuracy'])} (always none "
              f"{fmt(acc['always_none_exact_accuracy'])}), none-vs-some "
              f"{fmt(acc['none_vs_some_accuracy'])} (always {acc['majority_class']} "
              f"{fmt(acc['majority_none_vs_some_accuracy'])}) (n={acc['n']}, gold none "
              f"{acc['gold_none']}, predicted none {acc['predicted_none']})")  # fmt: skip
    for name, key in (("pal - base", "paired"), ("pal - always none", "pal_vs_always_none")):
        test = selection[key]
        print(f"  {name}: {fmt(test['mean_diff'])} [{fmt(test['ci95_low'])}, "
              f"{fmt(test['ci95_high'])}] p={fmt(test['p_value'], 4)}")  # fmt: skip
    if unavailable:
        print(f"\nunavailable metrics: {unavailable}")
    return {"summary": summary, "paired": paired, "selection": selection,
            "unavailable": unavailable}  # fmt: skip


def estimate(
    args: argparse.Namespace, pal: dict[str, Any], sbs: dict[str, Any], timings: dict[str, float]
) -> list[tuple[str, float, float]]:
    """(stage, seconds measured, seconds extrapolated to FULL_TRAIN/FULL_EVAL dialogues).

    Per-dialogue stages scale linearly. A trainer stage costs its step time (the log's
    train_runtime over its steps) times the full run's steps, plus the rest of its measured
    time (model loading; for DPO also the reference pass) scaled by the examples, which
    overestimates the fixed part a little. Examples, pairs and augmentations per dialogue are
    the quick run's.
    """
    ratio_train, ratio_eval = FULL_TRAIN / args.train_n, FULL_EVAL / args.eval_n
    batch = args.batch_size

    def trained(stage: dict[str, Any], folder: Path, items: int) -> float:
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        runtime = next((e["train_runtime"] for e in reversed(log) if "train_runtime" in e), 0.0)
        per_step = runtime / max(stage["steps"], 1)
        full_steps = math.ceil(items * ratio_train * args.epochs / batch)
        return per_step * full_steps + (stage["seconds"] - runtime) * ratio_train

    t1 = trained(pal["stage1"], args.work / "pal" / "stage1", pal["sft"]["total"])
    t2 = trained(pal["stage2"], args.work / "pal" / "stage2", pal["pairs"]["pairs"])
    t3 = trained(sbs["train"], args.work / "sbs" / "train", sbs["augment"]["examples"])

    def linear(name: str, stage: dict[str, Any], ratio: float) -> tuple[str, float, float]:
        return name, stage["seconds"], stage["seconds"] * ratio

    rows = [
        linear("pal labels (NLI)", pal["labels"], ratio_train),
        ("pal stage 1 (SFT)", pal["stage1"]["seconds"], t1),
        linear("pal stage-1 replies", pal["rejected"], ratio_train),
        ("pal stage 2 (DPO)", pal["stage2"]["seconds"], t2),
        linear("pal Select-then-Generate", pal["evaluate"], ratio_eval),
        linear("sbs augmentation", sbs["augment"], ratio_train),
        ("sbs SFT", sbs["train"]["seconds"], t3),
        linear("sbs replies", sbs["evaluate"], ratio_eval),
    ]
    rows += [(name, seconds, seconds * ratio_eval) for name, seconds in timings.items()]
    return rows


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parse_args()
    train, valid, held_out = prepare_data(args)
    print(f"{args.train_n} training / {args.eval_n} held-out FoCus dialogues → {args.work}")
    timings = Timings(args.work / "timings.json")
    pal = run_pal(args, train, valid)
    sbs = run_sbs(args, train, valid)
    base = run_base(args, held_out, timings)
    candidates = [
        *base,
        *read_records(args.work / "pal" / "eval" / "candidates.jsonl", Candidate),
        *read_records(args.work / "sbs" / "eval" / "candidates.jsonl", Candidate),
    ]
    systems = {"base": base[0].responder, "pal": RESPONDER_NAME, "sbs": "sbs"}
    scored, unavailable = score(args, held_out, candidates, timings)
    summary = summarize(scored, METRICS)

    labels = {
        lab.dialogue_id: lab
        for lab in read_records(args.work / "pal" / "eval" / "labels.jsonl", PersonaLabel)
    }
    pal_selections = read_records(args.work / "pal" / "eval" / "selections.jsonl", Selection)
    base_acc, base_hits = base_selection(args, held_out, labels, timings)
    pal_hits = hits(pal_selections, labels)
    always_none = {k: float(not labels[k].indices) for k in pal_hits}  # the majority answer
    selection = {
        "base": base_acc,
        "pal": pal["evaluate"]["selection"],
        "paired": paired_test(pal_hits, base_hits),
        "pal_vs_always_none": paired_test(pal_hits, always_none),
    }
    results = report(systems, summary, scored, unavailable, selection)
    results |= {"args": {k: str(v) for k, v in vars(args).items()}, "pal": pal, "sbs": sbs}
    rows = estimate(args, pal, sbs, timings.values)
    results["timings"] = rows
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(
        f"\nTimings (seconds measured here; extrapolated to {FULL_TRAIN} training / {FULL_EVAL} "
        f"held-out dialogues, {args.epochs:g} epoch(s), batch {args.batch_size}):"
    )
    for name, measured, full in rows:
        print(f"  {name:28s} {measured:9.1f} s   → {full / 3600:7.2f} h")
    total = sum(full for _, _, full in rows)
    held_out = sum(full for name, _, full in rows if name in EVAL_ROWS)
    print(f"  {'total':28s} {'':9s}     → {total / 3600:7.2f} h")
    per_100 = (total - held_out) / FULL_TRAIN * 100 / 3600
    print(
        f"  training cost is linear in --train-n: {per_100:.2f} h per 100 training dialogues, "
        f"plus {held_out / 3600:.2f} h for the {FULL_EVAL} held-out dialogues"
    )
    print(f"results: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
