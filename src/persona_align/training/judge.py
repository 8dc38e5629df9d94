"""Train our judges: the persona-consistency (C) and the coherence cross-encoders.

The C judge is a LoRA adapter over the embedded MiniLM (``training/cross_encoder.py``) trained
on items labelled by careful reading (``judge_data/`` in the repository says how they were
made) plus Dialogue NLI as speaker's-persona examples. The coherence judge is a small head over
frozen sentence embeddings (``metrics/coherence_judge.py``) trained on real next turns against
pseudo-negatives made from dialogues, as UniEval was. Input formats live beside the scorers.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from persona_align.data.nli import NLIPair
from persona_align.errors import InputError
from persona_align.files import write_folder
from persona_align.metrics.coherence_judge import (
    HEADS,
    CoherenceInput,
    CoherenceJudge,
    coherence_input,
    features,
    load_encoder,
)
from persona_align.metrics.judges import (
    C_LABELS,
    c_item_pair,
    c_label_index,
    c_pair,
    evaluate_judge,
    item_context,
    persona_sentences,
    read_judge_items,
)
from persona_align.metrics.nli import PairClassifier
from persona_align.records import Dialogue, JudgeInput, JudgeItem, Turn, read_jsonl
from persona_align.training.cross_encoder import (
    FitSettings,
    check_output,
    fit_pair_classifier,
    loss_curve,
    progress_bar,
    save_adapter_files,
)

Task = Literal["c", "coh"]
TASKS: tuple[str, ...] = ("c", "coh")
NEGATIVE_KINDS = (
    "other-dialogue",
    "other-position",
    "role-swap",
    "repetition",
    "truncated",
    "echo",
)


@dataclass
class JudgeTrainResult:
    task: str
    examples: int
    steps: int
    seconds: float
    settings: dict[str, Any]
    sources: dict[str, int]
    labels: dict[str, int]
    loss: list[float]  # mean training loss over 20 stretches of the run
    dev: dict[str, Any] = field(default_factory=dict)


def dnli_as_self_items(pairs: Sequence[NLIPair]) -> list[tuple[tuple[str, str], int]]:
    """Dialogue NLI pairs as C examples of the speaker's own persona: a persona sentence and an
    utterance of its owner, entailment = uses it, contradiction = contradicts it."""
    return [(c_pair([p.premise], "self", [], p.hypothesis), C_LABELS.index(p.label)) for p in pairs]


def _degenerate(reply: str, rng: random.Random) -> str:
    """A repetition loop of the kind small chat models fall into."""
    words = reply.split()
    size = rng.randint(2, min(8, max(2, len(words))))
    start = rng.randrange(0, max(1, len(words) - size + 1))
    loop = " ".join(words[start : start + size])
    head = " ".join(words[: rng.randint(0, len(words) // 2)])
    return " ".join([head] + [loop] * rng.randint(3, 8)).strip()


def coherence_examples(
    dialogues: Sequence[Dialogue], *, positions: int = 2, seed: int = 0
) -> list[tuple[CoherenceInput, int, str]]:
    """(input, label, kind) examples: real next turns (1) against pseudo-negatives (0).

    Positives are the responder's turns (the gold reply and up to ``positions`` earlier turns
    of the same speaker): in FoCus only the assistant answers, and a judge trained on the
    user's questions as replies would learn that a question after an answer is coherent. Each
    positive gets one negative, cycling through: the responder's turn in another dialogue, its
    turn at another position of this one, a turn of the other speaker (a reply in the wrong
    role), a repetition loop of the real turn, the real turn cut short, and an echo (of the
    turn being answered, or of the listener's persona spoken as if it were the responder's,
    alone or after the real answer).
    """
    rng = random.Random(seed)
    turns_of, responders = [], []
    for dialogue in dialogues:
        last = dialogue.context[-1].speaker
        responder = next((t.speaker for t in reversed(dialogue.context) if t.speaker != last),
                         "User2" if last != "User2" else "User1")  # fmt: skip
        turns = list(dialogue.context)
        if dialogue.reference:
            turns.append(Turn(speaker=responder, text=dialogue.reference))
        turns_of.append(turns)
        responders.append(responder)
    examples: list[tuple[CoherenceInput, int, str]] = []
    kind_index = 0
    for index, (dialogue, turns) in enumerate(zip(dialogues, turns_of, strict=True)):
        own = [k for k in range(1, len(turns)) if turns[k].speaker == responders[index]]
        if not own:
            continue
        chosen = {own[-1], *rng.sample(own, min(positions, len(own)))}
        for k in sorted(chosen):
            history, real = turns[:k], turns[k].text
            examples.append((coherence_input(history, real, dialogue.persona), 1, "real"))
            kind = NEGATIVE_KINDS[kind_index % len(NEGATIVE_KINDS)]
            kind_index += 1
            fake = _negative(kind, k, turns, turns_of, responders, index, dialogue, rng)
            if fake and fake.strip() and fake.strip() != real.strip():
                examples.append((coherence_input(history, fake, dialogue.persona), 0, kind))
    return examples


def _negative(
    kind: str,
    k: int,
    turns: list[Turn],
    turns_of: list[list[Turn]],
    responders: list[str],
    index: int,
    dialogue: Dialogue,
    rng: random.Random,
) -> str | None:
    real, responder = turns[k].text, responders[index]
    if kind == "other-dialogue":
        other = rng.choice([j for j in range(len(turns_of)) if j != index])
        found = [t.text for t in turns_of[other] if t.speaker == responders[other]]
        return rng.choice(found) if found else None
    if kind == "other-position":
        found = [t.text for j, t in enumerate(turns) if j != k and t.speaker == responder]
        return rng.choice(found) if found else None
    if kind == "role-swap":  # the other speaker's words as the responder's reply
        found = [t.text for j, t in enumerate(turns) if j != k - 1 and t.speaker != responder]
        return rng.choice(found) if found else None
    if kind == "repetition":
        return _degenerate(real, rng)
    if kind == "truncated":
        words = real.split()
        return " ".join(words[: max(1, int(len(words) * rng.uniform(0.2, 0.5)))])
    draw = rng.random()
    if dialogue.persona_role == "user" and draw < 0.75:
        # the responder talking as the listener: the real answer with a persona fact said in
        # the first person (what large models do when they slip into the user's role), or the
        # persona alone
        fact = rng.choice(dialogue.persona)
        return f"{real} {fact}" if draw < 0.5 else " ".join(dialogue.persona)
    return turns[k - 1].text


def _class_weights(labels: Sequence[int]) -> list[float]:
    """Inverse-frequency weights, so a rare class (contradiction) is not ignored."""
    counts = Counter(labels)
    total = len(labels)
    return [total / (len(counts) * counts[label]) for label in labels]


def train_judge(
    task: Task,
    out_dir: str | Path,
    *,
    train: Sequence[str | Path] = (),
    dev: Sequence[str | Path] = (),
    dialogues: Sequence[Dialogue] = (),
    dnli: Sequence[NLIPair] = (),
    settings: FitSettings | None = None,
    balance: bool = True,
    labelled_weight: float = 1.0,
    teacher: str | None = None,
    unlabelled: Sequence[str | Path] = (),
    progress: Any = None,
) -> JudgeTrainResult:
    """Train a judge and write it (weights + ``judge.json`` + ``training.json``) to ``out_dir``.

    C: ``train`` labelled judge files (the dev set's format) and ``dnli`` pairs. Coherence:
    ``dialogues`` (real turns and pseudo-negatives) and ``train`` files (0/1 labels).
    ``dev`` files are evaluated after training and reported, never trained on.
    ``labelled_weight``: what one read-and-labelled item counts against one DNLI pair or
    pseudo-labelled coherence example (there are far fewer of them, and they are the target).
    ``teacher`` (C): a judge whose label distributions the new one learns (distillation: a
    smaller, faster judge of the same quality) — half its distribution, half the known label for
    read items and DNLI pairs; its distribution alone for the ``unlabelled`` replies.
    """
    if task not in TASKS:
        raise InputError(None, f"judge task must be one of {', '.join(TASKS)}, got {task!r}")
    if not labelled_weight > 0:
        raise InputError(None, f"labelled_weight must be positive, got {labelled_weight!r}")
    settings = settings or FitSettings()
    out = Path(out_dir)
    check_output(out)
    items: list[JudgeItem] = [item for path in train for item in read_judge_items(path)]
    if task == "c":
        extra = [i for path in unlabelled for i in read_jsonl(path, JudgeInput)]
        teach = _Teaching(teacher, extra) if teacher is not None else None
        if extra and teach is None:
            raise InputError(None, "unlabelled replies are only used with a teacher")
        fit: Callable[..., tuple[JudgeTrainResult, Writer]] = partial(_fit_c, teach=teach)
    elif teacher is not None or unlabelled:
        raise InputError(None, "a teacher (distillation) is for the c judge only")
    else:
        fit = _fit_coherence
    result, write = fit(items, dialogues, dnli, settings, balance, labelled_weight, progress)

    def finish(tmp: Path) -> None:
        write(tmp)
        judge: Any = PairClassifier(str(tmp)) if task == "c" else CoherenceJudge(tmp)
        for path in dev:
            result.dev[Path(path).name] = evaluate_judge(
                task, judge, read_judge_items(path)
            ).as_dict()
        (tmp / "training.json").write_text(json.dumps(asdict(result), indent=2) + "\n")

    write_folder(out, finish)
    return result


Writer = Callable[[Path], None]


@dataclass
class _Teaching:
    """Distillation: the teacher judge and the unlabelled replies it labels."""

    teacher: str
    unlabelled: list[JudgeInput]


def _fit_c(
    items: Sequence[JudgeItem],
    dialogues: Sequence[Dialogue],
    dnli: Sequence[NLIPair],
    settings: FitSettings,
    balance: bool,
    labelled_weight: float,
    progress: Any,
    teach: _Teaching | None = None,
) -> tuple[JudgeTrainResult, Writer]:
    pairs = [c_item_pair(i) for i in items]
    labels = [c_label_index(i.label) for i in items]
    sources = {"labelled items": len(items)}
    if dnli:
        extra = dnli_as_self_items(dnli)
        pairs += [p for p, _ in extra]
        labels += [label for _, label in extra]
        sources["dnli"] = len(extra)
    targets = None
    if teach is not None:
        pairs += [c_item_pair(i) for i in teach.unlabelled]
        targets = _teacher_targets(teach.teacher, pairs, labels, progress)
        labels += [int(row.argmax()) for row in targets[len(labels) :]]
        sources["unlabelled (teacher)"] = len(teach.unlabelled)
    if not pairs:
        raise InputError(None, "no training examples: give --train files (or --dnli)")
    share = [labelled_weight] * len(items) + [1.0] * (len(pairs) - len(items))
    weights = _class_weights(labels) if balance else [1.0] * len(labels)
    model, _, config, losses, seconds = fit_pair_classifier(
        pairs, labels, C_LABELS, settings,
        weights=[w * k for w, k in zip(weights, share, strict=True)]
        if balance or labelled_weight != 1.0 else None,
        targets=None if targets is None else targets.tolist(),
        progress=progress, what="training the c judge",
    )  # fmt: skip
    result = JudgeTrainResult(
        "c", len(pairs), len(losses), round(seconds, 1),
        settings.as_dict() | {"balance": balance, "labelled_weight": labelled_weight}, sources,
        {C_LABELS[k]: v for k, v in sorted(Counter(labels).items())}, loss_curve(losses),
    )  # fmt: skip
    if teach is not None:
        result.settings["teacher"] = teach.teacher
    spec = {"task": "c", "max_length": settings.max_length, "format": 1}

    def write(tmp: Path) -> None:
        save_adapter_files(tmp, model, config)
        (tmp / "judge.json").write_text(json.dumps(spec, indent=2) + "\n")

    return result, write


def _teacher_targets(
    teacher: str, pairs: Sequence[tuple[str, str]], labels: Sequence[int], progress: Any
) -> Any:
    """Per pair, the distribution to learn: the teacher's, averaged half and half with the
    known label for the first ``len(labels)`` pairs (read items, then DNLI pairs)."""
    import numpy as np

    judge = PairClassifier(teacher)
    judge.load()
    if judge.spec.get("task") != "c":
        raise InputError(teacher, "is not a c judge (its judge.json does not say task c)")
    with progress_bar(progress, "teacher labels", len(pairs)) as advance:
        found = judge.probabilities(pairs, advance)
    hard = np.eye(len(C_LABELS), dtype=np.float32)[list(labels)]
    found[: len(labels)] = 0.5 * found[: len(labels)] + 0.5 * hard
    return found


def _fit_coherence(
    items: Sequence[JudgeItem],
    dialogues: Sequence[Dialogue],
    dnli: Sequence[NLIPair],
    settings: FitSettings,
    balance: bool,
    labelled_weight: float,
    progress: Any,
) -> tuple[JudgeTrainResult, Writer]:
    import time

    import numpy as np

    examples = coherence_examples(dialogues, seed=settings.seed)
    inputs = [e for e, _, _ in examples]
    labels = [label for _, label, _ in examples]
    share = [1.0] * len(labels)
    sources = {f"dialogues:{k}": n for k, n in Counter(k for _, _, k in examples).items()}
    for item in items:
        context = item_context(item)
        if context:
            inputs.append(coherence_input(context, item.reply, persona_sentences(item.persona)))
            labels.append(item.label)
            share.append(labelled_weight)
    if items:
        sources["labelled items"] = len(items)
    if not inputs:
        raise InputError(None, "no training examples: give dialogues (or --train files)")
    began = time.perf_counter()
    encoder = load_encoder(settings.base)
    encode = lambda texts: encoder.encode(  # noqa: E731 - one call site, read at a glance
        texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=progress is not None,
    )  # fmt: skip
    matrix = features(inputs, encode)
    weights: dict[str, Any] = {}
    losses: list[float] = []
    for name, columns in HEADS.items():
        for member in range(COH_SEEDS):
            head, head_losses = fit_coherence_head(
                matrix[:, columns], np.asarray(labels), epochs=settings.epochs, lr=settings.lr,
                seed=settings.seed + member, balance=balance, sample_weight=np.asarray(share),
            )  # fmt: skip
            weights |= {f"{name}/{member}/{key}": value for key, value in head.items()}
            losses += head_losses
    result = JudgeTrainResult(
        "coh", len(inputs), len(losses), round(time.perf_counter() - began, 1),
        settings.as_dict() | {"balance": balance, "labelled_weight": labelled_weight}, sources,
        {COH_NAMES[k]: v for k, v in sorted(Counter(labels).items())}, loss_curve(losses),
    )  # fmt: skip
    spec = {"task": "coh", "encoder": settings.base, "format": 2}

    def write(tmp: Path) -> None:
        np.savez(tmp / "head.npz", **weights)
        (tmp / "judge.json").write_text(json.dumps(spec, indent=2) + "\n")

    return result, write


COH_NAMES = ("incoherent", "coherent")
# heads trained per HEADS entry from consecutive seeds and averaged: one head's agreement with
# readers moved by up to 0.07 kappa with the seed alone (benchmarks/RESULTS.md)
COH_SEEDS = 5


def fit_coherence_head(
    matrix: Any, labels: Any, *, epochs: int, lr: float, seed: int, balance: bool,
    sample_weight: Any = None, hidden: int = 64, batch_size: int = 256,
) -> tuple[dict[str, Any], list[float]]:  # fmt: skip
    """Train the MLP head on standardised features with Adam and class-balanced BCE (times
    ``sample_weight`` per row); its weights as numpy arrays (what ``CoherenceHead`` reads) and
    the loss of every step."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    mean, scale = matrix.mean(0), matrix.std(0) + 1e-6
    x = torch.tensor((matrix - mean) / scale, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    rows = torch.ones_like(y) if sample_weight is None else torch.tensor(sample_weight).float()
    positive = float((rows * y).sum() / rows.sum())  # the weighted share of coherent rows
    balanced = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive)) if balance else 1.0
    weight = None if sample_weight is None and not balance else rows * balanced
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 1))  # fmt: skip
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    losses = []
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            rows = order[start : start + batch_size]
            logits = net(x[rows])[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y[rows], weight=None if weight is None else weight[rows]
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    first, last = net[0], net[3]
    weights = {
        "mean": mean.astype(np.float32), "scale": scale.astype(np.float32),
        "w1": first.weight.detach().numpy().T.copy(), "b1": first.bias.detach().numpy().copy(),
        "w2": last.weight.detach().numpy().T.copy(), "b2": last.bias.detach().numpy().copy(),
    }  # fmt: skip
    return weights, losses
