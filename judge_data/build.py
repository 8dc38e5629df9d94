"""Build the items our readers label, and assemble their labels into judge training data.

Items are drawn (seeded) from ``../shared/data``; the labels files in ``labels/`` hold only
item ids, labels, reasons and the text our readers wrote (minimal edits, new replies), so the
shared data is never copied here. ``python judge_data/build.py items OUT_DIR`` writes the
item batches given to the readers; ``python judge_data/build.py assemble OUT.jsonl`` joins
items and labels into training/evaluation records.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = Path(__file__).resolve().parent / "labels"
FOCUS_RESPONSES = DATA / "persobench-focus" / "responses"
FOCUS_PROMPTS = DATA / "persodpo-focus" / "prompts" / "valid.csv"
CHITCHAT = DATA / "persobench-chitchat" / "synthetic-personachat.csv"
SHOWN_TURNS = 4  # context turns shown to readers (and given to the judge)
# Synthetic-PersonaChat dialogues with index >= this are our self-role dev split.
CHITCHAT_DEV_FROM = 800
# FoCus valid prompts with row >= this may have coherence-labelled replies the coherence judge
# trains on; the coherence check's separation cases use the rows below it.
FOCUS_COH_TRAIN_FROM = 800
# the outcome benchmarks (persodpo_outcome.py, pal_sbs_outcome.py) evaluate on FoCus valid rows
# below this: no judge distils on replies to them
FOCUS_OUTCOME_ROWS = 200


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def split_turns(context: str) -> list[tuple[str, str]]:
    """``User1: ...``/``User 1: ...`` lines into (speaker, text); continuation lines join."""
    turns: list[tuple[str, str]] = []
    for line in context.splitlines():
        match = re.match(r"\s*(User ?[12])\s*:\s?(.*)", line)
        if match:
            turns.append((match.group(1).replace(" ", ""), match.group(2).strip()))
        elif turns and line.strip():
            turns[-1] = (turns[-1][0], turns[-1][1] + " " + line.strip())
    return turns


def chitchat_personas(field: str) -> dict[str, str]:
    """``[User 1 personas] :a\\nb <SEP> [User 2 personas] :c`` → {"User1": "a.b", ...}."""
    found = {}
    for part in field.split("<SEP>"):
        match = re.match(r"\s*\[User (\d) personas\]\s*:(.*)", part, re.S)
        if match:
            sentences = [s.strip() for s in match.group(2).splitlines() if s.strip()]
            found[f"User{match.group(1)}"] = "".join(
                s if s.endswith((".", "!", "?")) else s + "." for s in sentences
            )
    return found


def focus_item(system: str, row: int, prompts: list[dict[str, str]], reply: str) -> dict:
    prompt = prompts[row]
    turns = split_turns(prompt["context"])[-SHOWN_TURNS:]
    return {
        "id": f"pbf-{system}-{row:04d}",
        "source": f"persobench-focus/responses/{system}.csv",
        "row": row,
        "persona_role": "user",
        "persona": prompt["personas"],
        "context": "\n".join(f"{s}: {t}" for s, t in turns),
        "reply": reply,
    }


def focus_items() -> list[dict]:
    """Every valid LLM reply to the FoCus valid prompts (8 systems), shuffled (seed 0)."""
    prompts = read_csv(FOCUS_PROMPTS)
    items = []
    for path in sorted(FOCUS_RESPONSES.glob("*.csv")):
        for row, record in enumerate(read_csv(path)):
            reply = record["gen_response"].strip()
            if reply:
                items.append(focus_item(path.stem, row, prompts, reply))
    random.Random(0).shuffle(items)
    return items


def chitchat_item(row: int, turn: int, records: list[dict[str, str]]) -> dict | None:
    record = records[row]
    turns = split_turns(record["context"] + "\n" + record["act_response"])
    personas = chitchat_personas(record["personas"])
    if turn >= len(turns) or turns[turn][0] not in personas:
        return None
    speaker, reply = turns[turn]
    shown = turns[max(0, turn - SHOWN_TURNS) : turn]
    return {
        "id": f"spc-{row:04d}-t{turn:02d}",
        "source": "persobench-chitchat/synthetic-personachat.csv",
        "row": row,
        "turn": turn,
        "persona_role": "self",
        "persona": personas[speaker],
        "context": "\n".join(f"{s}: {t}" for s, t in shown),
        "reply": reply,
        "split": "dev" if row >= CHITCHAT_DEV_FROM else "train",
    }


def chitchat_items() -> list[dict]:
    """Two turns (from the third on) of every Synthetic-PersonaChat dialogue, seeded."""
    records = read_csv(CHITCHAT)
    rng = random.Random(0)
    items = []
    for row, record in enumerate(records):
        count = len(split_turns(record["context"] + "\n" + record["act_response"]))
        for turn in sorted(rng.sample(range(2, count), min(2, max(0, count - 2)))):
            item = chitchat_item(row, turn, records)
            if item:
                items.append(item)
    rng.shuffle(items)
    return items


def write_batches(items: list[dict], out: Path, name: str, size: int) -> None:
    for start in range(0, len(items), size):
        path = out / f"{name}-{start // size:02d}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for item in items[start : start + size]:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def make_items(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    focus = focus_items()
    chat = chitchat_items()
    write_batches(focus[:1350], out, "c-user", 150)
    write_batches(chat[:900], out, "c-self", 150)
    write_batches(focus[1350:1600], out, "x-user", 125)
    write_batches([i for i in chat[900:] if i["split"] == "train"][:250], out, "x-self", 125)
    # the second written round (edit / support / control): replies to prompts and dialogues
    # the first round's written items (whose fifth is held out) did not touch
    first_focus = {i["row"] for i in focus[1350:1600]}
    fresh_focus = [i for i in focus[1600:] if i["row"] not in first_focus]
    chat_train = [i for i in chat[900:] if i["split"] == "train"]
    first_chat = {i["row"] for i in chat_train[:250]}
    fresh_chat = [i for i in chat_train[250:] if i["row"] not in first_chat]
    for round_, start in (("x2", 0), ("x3", 1)):  # the third round as the second, on new items
        write_batches(fresh_focus[500 * start : 500 * (start + 1)], out, f"{round_}-user", 125)
        write_batches(fresh_chat[250 * start : 250 * (start + 1)], out, f"{round_}-self", 125)
    # coherence training labels: replies to rows the evaluated replies (focus[1600:1820]) and
    # the separation cases (rows < FOCUS_COH_TRAIN_FROM) do not use
    evaluated = {i["row"] for i in focus[1600:1820]}
    write_batches([i for i in focus[2400:] if i["row"] >= FOCUS_COH_TRAIN_FROM
                   and i["row"] not in evaluated][:1000], out, "coh-train", 200)  # fmt: skip
    print(f"{len(focus)} FoCus replies, {len(chat)} chit-chat turns")


def read_labels(pattern: str) -> list[dict]:
    return [json.loads(line) for path in sorted(LABELS.glob(pattern)) for line in path.open()]


def judge_record(item: dict, reply: str, label: int, kind: str) -> dict:
    """A labelled item in the dev set's format (what ``judge eval`` and ``train judge`` read)."""
    return {
        "id": f"{item['id']}:{kind}",
        "persona": item["persona"],
        "persona_role": item["persona_role"],
        "context": item["context"],
        "reply": reply,
        "label": label,
        "kind": kind,
    }


def edited(reply: str, edit: dict) -> str | None:
    """The reply with one minimal edit applied; None when the edit does not fit exactly."""
    if reply.count(edit["old"]) != 1 or edit["old"] == edit["new"]:
        return None
    return reply.replace(edit["old"], edit["new"])


def written_records(item: dict, written: dict) -> list[dict]:
    """A written item's replies: the edit (-1), the support (1; rounds 2-3), the control (its
    label) and the natural contradiction (-1), each when present and its edit fits."""
    records = []
    for kind, change, label in (
        ("edit", written.get("edit"), -1),
        ("support", written.get("support"), 1),
        ("control", written.get("control"), (written.get("control") or {}).get("label")),
    ):
        reply = edited(item["reply"], change) if change else None
        if reply is not None and label in (-1, 0, 1):
            records.append(judge_record(item, reply, label, kind))
    if written.get("natural"):
        records.append(judge_record(item, written["natural"], -1, "natural"))
    return records


def assemble(out: Path) -> None:
    """Join items and labels into the C judge's files:

    - ``c-train.jsonl``: read replies (FoCus valid prompts, user role; Synthetic-PersonaChat
      dialogues < CHITCHAT_DEV_FROM, self role), the written edits of 4 items in 5 of the
      first round and all of the second round (edit / support / control / natural);
    - ``c-dev-self.jsonl``: read replies of the held-out Synthetic-PersonaChat dialogues;
    - ``c-edits-eval.jsonl``: the minimal edits, controls and natural contradictions of every
      5th written item (held out: contradiction recall is measured on it);
    - ``coh-readers.jsonl``: the first reader's coherence labels (evaluation only);
    - ``coh-train.jsonl``: coherence labels of replies to FoCus valid rows >=
      FOCUS_COH_TRAIN_FROM (the coherence judge trains on them);
    - ``c-unlabelled.jsonl``: every valid LLM reply to a FoCus valid prompt of a row >=
      FOCUS_OUTCOME_ROWS that no held-out edit comes from, without a label: what a distilled
      judge learns the teacher's view of.
    """
    items = {item["id"]: item for item in focus_items() + chitchat_items()}
    train, dev_self, edits_eval = [], [], []
    for label in read_labels("c-*.jsonl"):
        item = items[label["item"]]
        record = judge_record(item, item["reply"], label["label"], "read")
        (dev_self if item.get("split") == "dev" else train).append(record)
    for position, written in enumerate(read_labels("x-*.jsonl")):
        target = edits_eval if position % 5 == 0 else train
        target += written_records(items[written["item"]], written)
    for written in read_labels("x[23]-*.jsonl"):  # the second and third rounds: training only
        train += written_records(items[written["item"]], written)
    coherence, coherence_train = [], []
    for label in read_labels("coh-00.a.jsonl"):
        item = items[label["item"].removeprefix("coh-")]
        coherence.append(judge_record(item, item["reply"], label["label"], "read"))
    for label in read_labels("coh-train-*.a.jsonl"):
        item = items[label["item"].removeprefix("coh-")]
        coherence_train.append(judge_record(item, item["reply"], label["label"], "read"))
    held_out = {items[r["id"].split(":")[0]]["row"] for r in edits_eval
                if r["id"].startswith("pbf-")}  # fmt: skip
    unlabelled = [
        {key: item[key] for key in ("id", "persona", "persona_role", "context", "reply")}
        for item in focus_items() if item["row"] not in held_out and
        item["row"] >= FOCUS_OUTCOME_ROWS
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("c-train", train), ("c-dev-self", dev_self),
                          ("c-edits-eval", edits_eval), ("coh-readers", coherence),
                          ("coh-train", coherence_train),
                          ("c-unlabelled", unlabelled)):  # fmt: skip
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(name, len(records))


if __name__ == "__main__":
    command, target = sys.argv[1], Path(sys.argv[2])
    if command == "items":
        make_items(target)
    elif command == "assemble":
        assemble(target)
    else:
        raise SystemExit(f"unknown command {command!r}")


def chitchat_dialogues(rows: range) -> list:
    """Synthetic-PersonaChat rows as Dialogue records (the next turn's speaker's persona)."""
    from persona_align.records import Dialogue, Turn

    records = read_csv(CHITCHAT)
    found = []
    for row in rows:
        record = records[row]
        turns = split_turns(record["context"] + "\n" + record["act_response"])
        personas = chitchat_personas(record["personas"])
        if len(turns) < 2 or turns[-1][0] not in personas:
            continue
        found.append(
            Dialogue(
                id=f"spc-{row:04d}",
                persona=[s + "." for s in personas[turns[-1][0]].split(".") if s.strip()],
                persona_role="self",
                context=[Turn(speaker=s, text=t) for s, t in turns[:-1] if t],
                reference=turns[-1][1],
                source="synthetic-personachat",
            )
        )
    return found
