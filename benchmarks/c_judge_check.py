"""Does C agree with careful readers? The C judges against reader labels, and their speed.

Judges, in one run: the shipped ``embedded-c-judge`` (the default of ``c``), the earlier
default ``embedded-nli`` in PersoBench mode and in PAL's ``max`` mode, and, on the FoCus dev
set, the PersoDPO authors' own per-reply C labels (their DNLI-tuned BERT, from
``persodpo-focus/scores``). Sets:

- FoCus dev: ``persona-consistency/focus-dev.jsonl``, 100 gold labels (listener's persona);
- self-role dev: held-out Synthetic-PersonaChat turns labelled by our readers (speaker's own);
- edits: held-out minimal edits (-1), their size-matched controls and natural contradictions;
- DNLI valid (persona sentence vs utterance, its own labels).

Figures: accuracy, Cohen's kappa, false contradictions (share of gold-not--1 items called -1),
contradiction recall; then replies/s of each judge on the PersoDPO pool's valid replies
(``--speed-prompts`` prompts x 7 systems), fp32, same run, same threads.

    .venv/bin/python judge_data/build.py assemble /tmp/judge-data
    .venv/bin/python benchmarks/c_judge_check.py [--assembled /tmp/judge-data] [--speed-prompts 100]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from machine import describe

from persona_align.data import read_dialogues
from persona_align.data.nli import read_nli
from persona_align.data.responses import import_responses
from persona_align.metrics import make_metric
from persona_align.metrics.base import ScoreItem
from persona_align.metrics.judges import agreement, persona_sentences, read_judge_items
from persona_align.metrics.judges import parse_context as parse
from persona_align.records import Candidate, Dialogue, JudgeItem

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POOL = DATA / "persodpo-focus"
JUDGES = {
    "embedded-c-judge (default)": {},
    "embedded-nli, persobench mode (earlier default)": {"model": "embedded-nli"},
    "embedded-nli, max mode (PAL)": {"model": "embedded-nli", "mode": "max"},
}


def as_item(judged: JudgeItem, index: int) -> ScoreItem:
    context = parse(judged.context) if judged.context.strip() else []
    dialogue = Dialogue(id=f"j{index}", persona=persona_sentences(judged.persona),
                        persona_role=judged.persona_role,
                        context=context or [parse("User1: -")[0]])  # fmt: skip
    candidate = Candidate(dialogue_id=dialogue.id, responder="r", raw=judged.reply,
                          response=judged.reply, valid=True)  # fmt: skip
    return ScoreItem(dialogue, candidate)


def dnli_items() -> list[JudgeItem]:
    pairs = read_nli(DATA / "nli/dnli_songhaoyu_RCDG/nli-valid.txt", "dnli")
    label = {"entailment": 1, "neutral": 0, "contradiction": -1}
    return [JudgeItem(persona=[p.premise], persona_role="self", context="", reply=p.hypothesis,
                      label=label[p.label]) for p in pairs]  # fmt: skip


def authors_labels(items: list[JudgeItem]) -> list[int]:
    """The PersoDPO authors' C label of each dev reply (their scores file, same row)."""
    cache: dict[str, list[dict[str, str]]] = {}
    found = []
    for item in items:
        system, row = item.model_extra["system"], item.model_extra["row"]
        if system not in cache:
            with (POOL / "scores" / f"{system}.csv").open(newline="") as handle:
                cache[system] = list(csv.DictReader(handle))
        found.append(int(float(cache[system][row]["C Score"])))
    return found


def line(name: str, data: str, gold: list[int], predicted: list[int]) -> str:
    found = agreement(gold, predicted, [1, 0, -1])
    recall = found.per_class()["-1"]["recall"]
    false = found.false_contradictions
    return (f"| {data} | {name} | {found.items} | {found.accuracy:.3f} | {found.kappa:.3f} | "
            f"{'-' if false is None else f'{false:.1%}'} | "
            f"{'-' if recall is None else f'{recall:.3f}'} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assembled", type=Path, default=Path("/tmp/judge-data"))
    parser.add_argument("--speed-prompts", type=int, default=100)
    parser.add_argument("--opt", action="append", default=[], help="extra judge: NAME=DIR")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent")
    torch.set_num_threads(2)
    judges = dict(JUDGES)
    for extra in args.opt:
        name, _, folder = extra.partition("=")
        judges[name] = {"model": folder}
    sets = {"FoCus dev (user)": read_judge_items(DATA / "persona-consistency/focus-dev.jsonl")}
    for name, file in (
        ("self-role dev", "c-dev-self.jsonl"),
        ("edits (held out)", "c-edits-eval.jsonl"),
    ):
        if (args.assembled / file).exists():
            sets[name] = read_judge_items(args.assembled / file)
    sets["DNLI valid (self)"] = dnli_items()
    print(describe() + "\n")
    print(
        "| data | judge | items | accuracy | kappa | false contradictions | contradiction recall |"
    )
    print("|---|---|---|---|---|---|---|")
    metrics = {name: make_metric("c", **options) for name, options in judges.items()}
    for metric in metrics.values():
        metric.load()
    for data, items in sets.items():
        scored = [as_item(item, i) for i, item in enumerate(items)]
        gold = [item.label for item in items]
        for name, metric in metrics.items():
            predicted = [
                int(v) if v in (-1.0, 0.0, 1.0) else round(v) for v in metric.score(scored)
            ]
            print(line(name, data, gold, predicted))
        if data.startswith("FoCus dev"):
            print(line("PersoDPO authors' labels (DNLI BERT)", data, gold, authors_labels(items)))
        if data.startswith("edits"):
            for kind in ("edit", "control", "natural"):
                subset = [i for i, item in enumerate(items) if item.model_extra["kind"] == kind]
                for name, metric in metrics.items():
                    values = metric.score([scored[i] for i in subset])
                    print(line(name, f"edits: {kind}", [gold[i] for i in subset],
                               [round(v) for v in values]))  # fmt: skip
    dialogues = read_dialogues("persobench-csv", POOL / "prompts" / "train.csv")
    pool = []
    for path in sorted((POOL / "responses").glob("*.csv")):
        candidates = import_responses(path, dialogues, extraction="none")
        pool += [ScoreItem(d, c) for d, c in list(zip(dialogues, candidates, strict=True))[
            : args.speed_prompts] if c.valid]  # fmt: skip
    print("\n| judge | replies | seconds | replies/s | ratio to earlier default |")
    print("|---|---|---|---|---|")
    rates = {}
    for name, options in judges.items():
        metric = make_metric("c", batch_size=63, **options)  # its own model: no shared memo
        metric.load()
        began = time.perf_counter()
        metric.score(pool)
        seconds = time.perf_counter() - began
        rates[name] = len(pool) / seconds
    base = rates["embedded-nli, persobench mode (earlier default)"]
    for name, rate in rates.items():
        print(
            f"| {name} | {len(pool)} | {len(pool) / rate:.1f} | {rate:.1f} | {rate / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
