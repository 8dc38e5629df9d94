"""PAL: persona labels, stage-1 mixture, stage-2 pairs, Select-then-Generate inference."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from persona_align.errors import InputError
from persona_align.generation.base import GenerationParams, Request, Responder, Result
from persona_align.inference import select_generate as stg
from persona_align.preference.pal import (
    NO_PERSONA,
    TASKS,
    PALDataConfig,
    PersonaLabel,
    build_pal_pairs,
    build_pal_sft,
    generate_rejected,
    label_personas,
    mixture_counts,
    persona_messages,
    plain_messages,
)
from persona_align.prompting import extract_response, messages_hash
from persona_align.records import (
    Candidate,
    Dialogue,
    Message,
    PreferencePair,
    Turn,
    read_records,
    write_records,
)


@pytest.fixture(scope="module")
def sample() -> list[Dialogue]:
    path = Path(str(resources.files("persona_align") / "sample_data" / "train.jsonl"))
    return read_records(path, Dialogue)


def _dialogue(
    id: str = "d1", grounding: list[bool] | None = None, reference: str | None = "Gold reply."
) -> Dialogue:
    return Dialogue(
        id=id,
        persona=["I have a dog named Rex.", "I am a nurse.", "I love jazz.", "I live in Oslo."],
        context=[Turn(speaker="User1", text="What do you do at night?")],
        reference=reference,
        persona_grounding=grounding,
    )


class KeywordNLI:
    """Entailment when the premise's keyword occurs in the hypothesis; records every call."""

    def __init__(self, keywords: dict[str, tuple[str, float]]) -> None:
        self.keywords = keywords  # premise → (word that must be in the hypothesis, p(entail))
        self.calls: list[list[tuple[str, str]]] = []

    def __call__(self, pairs):
        self.calls.append(list(pairs))
        rows = []
        for premise, hypothesis in pairs:
            word, p = self.keywords.get(premise, ("\0", 0.0))
            if word.lower() in hypothesis.lower():
                rows.append([p, (1 - p) / 2, (1 - p) / 2])
            else:
                rows.append([0.1, 0.8, 0.1])
        return np.array(rows)


def _all_labelled(dialogues: list[Dialogue]) -> dict[str, PersonaLabel]:
    """Deterministic labels for the sample: every third dialogue has none, others a sentence."""
    return {
        d.id: PersonaLabel(
            dialogue_id=d.id, indices=[] if k % 3 == 0 else [k % len(d.persona)], source="nli"
        )
        for k, d in enumerate(dialogues)
    }


# --- labels --------------------------------------------------------------------------------


def test_labels_from_grounding_do_not_call_nli() -> None:
    nli = KeywordNLI({})
    labels = label_personas([_dialogue(grounding=[False, True, False, True])], nli=nli)
    assert labels["d1"].indices == [1, 3]
    assert labels["d1"].source == "grounding"
    assert labels["d1"].target == 1
    assert nli.calls == []
    none = label_personas([_dialogue(id="d2", grounding=[False] * 4)], nli=nli)["d2"]
    assert none.indices == [] and none.target is None


def test_labels_from_nli_with_injected_scorer(sample: list[Dialogue]) -> None:
    first = sample[0]  # lighthouse keeper; gold reply mentions the cat Biscuit and the mainland
    nli = KeywordNLI(
        {
            first.persona[1]: ("Biscuit", 0.7),  # entailed
            first.persona[3]: ("mainland", 0.9),  # entailed, more probable → first
            first.persona[0]: ("submarine", 0.9),  # keyword absent → neutral
        }
    )
    no_reply = sample[1].model_copy(update={"reference": None})
    none_entailed = sample[2]
    labels = label_personas([first, no_reply, none_entailed], nli=nli)
    assert labels[first.id].indices == [3, 1]
    assert labels[first.id].source == "nli"
    assert labels[none_entailed.id].indices == []  # "none"
    assert no_reply.id not in labels  # neither grounding nor gold reply: no label
    (pairs,) = nli.calls
    assert pairs[: len(first.persona)] == [(s, first.reference) for s in first.persona]
    assert len(pairs) == len(first.persona) + len(none_entailed.persona)


def test_labels_with_the_embedded_nli_model(sample: list[Dialogue]) -> None:
    from persona_align.metrics.base import Unavailable

    try:
        labels = label_personas(sample[:3])
    except Unavailable as err:
        pytest.skip(f"embedded NLI unavailable: {err}")
    assert set(labels) == {d.id for d in sample[:3]}
    for d in sample[:3]:
        assert labels[d.id].source == "nli"
        assert all(0 <= i < len(d.persona) for i in labels[d.id].indices)


def test_labels_round_trip_as_jsonl(tmp_path: Path) -> None:
    labels = [PersonaLabel(dialogue_id="a", indices=[2, 0], source="grounding")]
    write_records(tmp_path / "labels.jsonl", labels, PersonaLabel)
    assert read_records(tmp_path / "labels.jsonl", PersonaLabel) == labels


def test_duplicate_dialogue_ids_are_bad_input() -> None:
    with pytest.raises(InputError, match="appears twice"):
        label_personas([_dialogue(grounding=[True] * 4), _dialogue(grounding=[True] * 4)])


# --- stage 1: prompts and mixture ----------------------------------------------------------


def test_select_prompt_and_targets() -> None:
    grounded = _dialogue("g", grounding=[False, False, True, False])
    ungrounded = _dialogue("n", grounding=[False] * 4)
    labels = label_personas([grounded, ungrounded])
    config = PALDataConfig(ratios={"select": 1.0})
    examples, summary = build_pal_sft([grounded, ungrounded], labels, config)
    by_id = {e.dialogue_id: e for e in examples}
    assert summary["examples"]["select"] == 2 and {e.task for e in examples} == {"select"}
    prompt = by_id["g"].prompt[-1].content
    for k, sentence in enumerate(grounded.persona, start=1):
        assert f"{k}. {sentence}" in prompt
    assert "User1: What do you do at night?" in prompt
    assert f'"{NO_PERSONA}"' in prompt
    assert by_id["g"].completion[0].content == "I love jazz."
    assert by_id["g"].meta == {"persona_index": 2, "label_source": "grounding"}
    assert by_id["n"].completion[0].content == NO_PERSONA


def test_generation_prompts_and_json_completions() -> None:
    d = _dialogue(grounding=[False, True, False, False])
    labels = label_personas([d])
    examples, _ = build_pal_sft(
        [d], labels, PALDataConfig(ratios={"generate-persona": 1, "generate-plain": 1})
    )
    by_task = {e.task: e for e in examples}
    with_persona = by_task["generate-persona"].prompt[-1].content
    assert "Highlighted personal description: I am a nurse." in with_persona
    assert '"response"' in with_persona
    plain = by_task["generate-plain"].prompt[-1].content
    assert not any(s in plain for s in d.persona)
    for example in examples:
        completion = example.completion[0].content
        assert json.loads(completion) == {"response": "Gold reply."}
        assert extract_response(completion) == "Gold reply."
    text, _ = build_pal_sft(
        [d], labels, PALDataConfig(ratios={"generate-plain": 1}, response_format="text")
    )
    assert text[0].completion[0].content == "Gold reply."
    assert "JSON" not in text[0].prompt[-1].content
    assert persona_messages(d, None)[-1].content.count(NO_PERSONA) == 2  # rule + highlight


def test_mixture_ratios_are_respected(sample: list[Dialogue]) -> None:
    labels = _all_labelled(sample)
    ratios = {"select": 0.5, "generate-persona": 0.3, "generate-plain": 0.2}
    for max_examples in (None, 40, 17):
        config = PALDataConfig(
            ratios=ratios, max_examples=max_examples, seed=3, select_none_share=None
        )
        examples, summary = build_pal_sft(sample, labels, config)
        total = len(examples)
        assert total == summary["total"]
        if max_examples is not None:
            assert total == max_examples
        else:  # the largest mixture that fits: select is the bottleneck (every dialogue once)
            assert total == int(len(sample) / 0.5)
        for task, share in ratios.items():
            count = sum(1 for e in examples if e.task == task)
            assert count == summary["examples"][task]
            assert abs(count - total * share) < 1
            assert len({e.dialogue_id for e in examples if e.task == task}) == count


def test_select_answers_are_balanced_by_default(sample: list[Dialogue]) -> None:
    """Labels lean to none; trained on them as they are, the select task collapsed to always
    answering none. By default half the select examples answer none, half name a sentence."""
    labels = _all_labelled(sample)  # 18 of the 52 labelled none

    def answers(**options: object) -> tuple[int, int]:
        config = PALDataConfig(ratios={"select": 1.0}, **options)
        examples, summary = build_pal_sft(sample, labels, config)
        none = sum(e.completion[0].content == NO_PERSONA for e in examples)
        assert summary["select_answers"] == {"none": none, "persona": len(examples) - none}
        assert len({e.dialogue_id for e in examples}) == len(examples)
        return none, len(examples) - none

    assert answers() == (18, 18)
    assert answers(select_none_share=0.25) == (11, 34)  # 45 examples: 34 persona is the limit
    assert answers(select_none_share=None) == (18, 34)  # the labels' own share
    one_sided = {k: v.model_copy(update={"indices": [0]}) for k, v in labels.items()}
    with pytest.raises(InputError, match=r"select_none_share 0\.5 needs both answers"):
        build_pal_sft(sample, one_sided, PALDataConfig())
    examples, _ = build_pal_sft(sample, one_sided, PALDataConfig(select_none_share=None))
    assert any(e.task == "select" for e in examples)


def test_mixture_counts_never_exceed_what_is_available() -> None:
    shares = {"select": 0.2, "generate-persona": 0.2, "generate-plain": 0.6}
    counts = mixture_counts(
        {"select": 50, "generate-persona": 50, "generate-plain": 9}, shares, None
    )
    assert counts == {"select": 3, "generate-persona": 3, "generate-plain": 9}
    assert mixture_counts({t: 0 for t in TASKS}, shares, 10) == {t: 0 for t in TASKS}


def test_mixture_is_seed_reproducible(sample: list[Dialogue]) -> None:
    labels = _all_labelled(sample)

    def build(seed: int) -> list[tuple[str, str]]:
        examples, _ = build_pal_sft(sample, labels, PALDataConfig(seed=seed, max_examples=30))
        return [(e.task, e.dialogue_id) for e in examples]

    assert build(7) == build(7)
    assert build(7) != build(8)


def test_unlabelled_and_unanswered_dialogues_are_skipped_and_counted(
    sample: list[Dialogue],
) -> None:
    dialogues = [*sample[:4], sample[4].model_copy(update={"reference": None})]
    labels = {k: v for k, v in _all_labelled(dialogues).items() if k != sample[0].id}
    examples, summary = build_pal_sft(
        dialogues, labels, PALDataConfig(ratios={t: 1.0 for t in TASKS})
    )
    assert summary["skipped"]["select"] == {"no_label": 1}
    assert summary["skipped"]["generate-persona"] == {"no_label": 1, "no_reference": 1}
    assert summary["skipped"]["generate-plain"] == {"no_reference": 1}
    assert summary["labels"]["unlabelled"] == 1
    assert all(e.dialogue_id != sample[0].id for e in examples if e.task == "select")


def test_bad_mixture_config_is_rejected() -> None:
    from pydantic import ValidationError

    for bad in ({"ratios": {"select": -1}}, {"ratios": {"select": 0}}, {"ratios": {"chat": 1}}):
        with pytest.raises(ValidationError):
            PALDataConfig.model_validate(bad)


# --- stage 2: rejected replies and pairs ---------------------------------------------------


def _candidate(dialogue_id: str, response: str | None, raw: str = "") -> Candidate:
    return Candidate(
        dialogue_id=dialogue_id,
        responder="stage1",
        raw=raw or (response or "garbage"),
        response=response,
        valid=response is not None,
    )


def test_pairs_have_gold_chosen_and_drop_failures_and_duplicates() -> None:
    a = _dialogue("a", grounding=[True, False, False, False], reference="Rex keeps me company.")
    b = _dialogue("b", grounding=[False] * 4, reference="Just reading.")
    labels = label_personas([a, b])
    candidates = [
        _candidate("a", "I watch TV."),
        _candidate("a", "  rex KEEPS me company. "),  # same as the gold reply
        _candidate("a", "i watch tv."),  # repeats a rejected reply
        _candidate("b", None, raw="{broken"),  # failed
        _candidate("b", "I sleep."),
    ]
    pairs, summary = build_pal_pairs([a, b], candidates, labels)
    assert summary["dropped"] == {"same_as_gold": 1, "duplicate": 1, "failed": 1}
    assert summary["pairs"] == len(pairs) == 2
    first, second = pairs
    assert json.loads(first.chosen[0].content) == {"response": "Rex keeps me company."}
    assert json.loads(first.rejected[0].content) == {"response": "I watch TV."}
    assert first.rule == "pal" and first.weight == 1.0
    assert first.score_chosen > first.score_rejected
    assert first.prompt == persona_messages(a, "I have a dog named Rex.")
    assert second.prompt == persona_messages(b, None)
    PreferencePair.model_validate(first.model_dump())  # loadable as the pair record


def test_pairs_reject_unknown_dialogues() -> None:
    with pytest.raises(InputError, match="unknown dialogue"):
        build_pal_pairs([_dialogue()], [_candidate("zz", "hi")], {})


class RecordingResponder(Responder):
    kind = "recording"

    def __init__(self) -> None:
        super().__init__("stage1")
        self.seen: list[Request] = []

    def settings(self) -> dict:
        return {"kind": self.kind}

    def generate(self, requests, params, on_result) -> None:
        for request in requests:
            self.seen.append(request)
            raw = "nope" if request.dialogue.id == "b" else '{"response": "Plain reply."}'
            on_result(request, Result(raw=raw, latency_s=0.01))


def test_rejected_replies_come_from_the_no_persona_prompt(tmp_path: Path) -> None:
    from persona_align.generation.cache import GenerationCache

    dialogues = [
        _dialogue("a", grounding=[True] * 4),
        _dialogue("b", grounding=[True] * 4).model_copy(
            update={"context": [Turn(speaker="User1", text="Any pets?")]}
        ),
        _dialogue("c", grounding=[True] * 4),  # same prompt as "a": generated once
    ]
    responder = RecordingResponder()
    cache = GenerationCache(tmp_path / "cache.sqlite")
    candidates = generate_rejected(dialogues, responder, GenerationParams(), cache=cache)
    assert [r.messages for r in responder.seen] == [plain_messages(d) for d in dialogues[:2]]
    assert [c.response for c in candidates] == ["Plain reply.", None, "Plain reply."]
    assert [c.dialogue_id for c in candidates] == ["a", "b", "c"]
    assert candidates[0].prompt_hash == messages_hash(plain_messages(dialogues[0]))
    again = generate_rejected(dialogues, responder, GenerationParams(), cache=cache)
    assert len(responder.seen) == 2  # the second run came from the cache
    assert again == candidates


def test_rejected_replies_with_hf_responder(tiny_llama_dir: Path, sample: list[Dialogue]) -> None:
    from persona_align.generation.hf import HFResponder

    responder = HFResponder(model=str(tiny_llama_dir), batch_size=2, name="stage1")
    candidates = generate_rejected(
        sample[:2],
        responder,
        GenerationParams(max_new_tokens=4),
        PALDataConfig(response_format="text"),
    )
    assert [c.dialogue_id for c in candidates] == [d.id for d in sample[:2]]
    for c, d in zip(candidates, sample[:2], strict=True):
        assert c.responder == "stage1"
        assert c.prompt_hash == messages_hash(plain_messages(d, "text"))
        assert c.valid == bool(c.raw.strip())


# --- Select then Generate ------------------------------------------------------------------


PERSONA = ["I have a dog named Rex.", "I am a nurse.", "I love jazz.", "I live in Oslo."]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I love jazz.", (2, "exact")),
        ("  3. i love jazz  \nand more", (2, "normalised")),
        ('"I am a nurse"', (1, "normalised")),
        ("4", (3, "normalised")),
        ("4.", (3, "normalised")),
        ("2.I am a nurse", (1, "normalised")),
        ("I really love the jazz music", (2, "overlap")),
        ("No personal description. None fits.", (None, "no-persona")),
        ("Purple elephants dance.", (None, "unmatched")),
        ("", (None, "unmatched")),
    ],
)
def test_generated_text_maps_to_a_persona_sentence(text: str, expected: tuple) -> None:
    assert stg.match_persona(text, PERSONA) == expected


def test_overlap_threshold_is_applied() -> None:
    assert stg.match_persona("a dog", PERSONA, threshold=0.2)[0] == 0
    assert stg.match_persona("a dog", PERSONA, threshold=0.9) == (None, "unmatched")


def _fake_generation(pass1_answer: str):
    """Stands in for the model: answers the select prompt with ``pass1_answer`` and records
    the pass-2 prompts it is given."""
    seen: dict[str, list[str]] = {"select": [], "generate": []}

    def fake(model, tokenizer, prompts, params, batch_size=8, on_batch=None):
        out = []
        for prompt in prompts:
            text = prompt[-1].content
            if "Highlighted personal description:" not in text:
                seen["select"].append(text)
                out.append(Result(raw=pass1_answer, latency_s=0.5))
            else:
                seen["generate"].append(text)
                out.append(Result(raw='{"response": "A reply."}', latency_s=1.0))
        if on_batch:
            on_batch(len(prompts))
        return out

    return fake, seen


def test_select_then_generate_uses_the_predicted_persona(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _dialogue(grounding=[True, False, False, False])  # gold: the dog
    labels = label_personas([d])
    fake, seen = _fake_generation("I love jazz.")  # the model picks jazz instead
    monkeypatch.setattr(stg, "generate_texts", fake)
    candidates, selections = stg.select_then_generate([d], None, None, labels=labels)
    assert len(seen["select"]) == 1
    (prompt,) = seen["generate"]
    assert "Highlighted personal description: I love jazz." in prompt
    assert "Highlighted personal description: I have a dog named Rex." not in prompt
    assert selections[0].selected == "I love jazz." and selections[0].method == "exact"
    (c,) = candidates
    assert c.responder == "pal-stg" and c.response == "A reply." and c.valid
    assert c.latency_s == pytest.approx(1.5)
    assert c.prompt_hash == messages_hash(persona_messages(d, "I love jazz."))
    assert stg.selection_accuracy(selections, labels)["exact_accuracy"] == 0.0


def test_gold_selection_mode_highlights_the_label(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _dialogue(grounding=[True, False, False, False])
    labels = label_personas([d])
    fake, seen = _fake_generation("I love jazz.")
    monkeypatch.setattr(stg, "generate_texts", fake)
    _, selections = stg.select_then_generate([d], None, None, selection="gold", labels=labels)
    assert seen["select"] == []
    assert "Highlighted personal description: I have a dog named Rex." in seen["generate"][0]
    assert selections[0].method == "gold" and selections[0].index == 0
    with pytest.raises(InputError, match="no persona label"):
        stg.select_then_generate([d], None, None, selection="gold", labels={})


def test_unmatched_selection_generates_without_persona(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, seen = _fake_generation("Purple elephants dance.")
    monkeypatch.setattr(stg, "generate_texts", fake)
    selected, raw, response = stg.select_then_generate_one(
        None, None, PERSONA, [Message(role="user", content="Hi, what do you do?")]
    )
    assert selected is None and response == "A reply." and raw == '{"response": "A reply."}'
    assert f"Highlighted personal description: {NO_PERSONA}" in seen["generate"][0]
    assert "User1: Hi, what do you do?" in seen["generate"][0]


def test_selection_accuracy() -> None:
    labels = {
        "a": PersonaLabel(dialogue_id="a", indices=[1, 2], source="grounding"),
        "b": PersonaLabel(dialogue_id="b", indices=[], source="grounding"),
        "c": PersonaLabel(dialogue_id="c", indices=[0], source="nli"),
        "d": PersonaLabel(dialogue_id="d", indices=[], source="nli"),
    }

    def sel(dialogue_id: str, index: int | None) -> stg.Selection:
        method = "exact" if index is not None else "no-persona"
        return stg.Selection(
            dialogue_id=dialogue_id, raw="", index=index, selected=None, method=method
        )

    # a: second gold sentence (right); b: none = none (right); c: wrong sentence; d: some vs none;
    # e: unlabelled
    selections = [sel("a", 2), sel("b", None), sel("c", 3), sel("d", 1), sel("e", 0)]
    report = stg.selection_accuracy(selections, labels)
    assert report["n"] == 4 and report["unlabelled"] == 1
    assert report["exact_accuracy"] == pytest.approx(2 / 4)
    assert report["none_vs_some_accuracy"] == pytest.approx(3 / 4)
    assert report["gold_none"] == 2 and report["predicted_none"] == 1
    # next to the majority-class baselines: always none gets b and d right
    assert report["always_none_exact_accuracy"] == pytest.approx(2 / 4)
    assert report["majority_none_vs_some_accuracy"] == pytest.approx(2 / 4)
    collapsed = stg.selection_accuracy([sel(k, None) for k in "abc"], labels)
    assert collapsed["majority_class"] == "persona"  # a and c name a sentence, b none
    assert collapsed["exact_accuracy"] == collapsed["always_none_exact_accuracy"] == 1 / 3
    assert collapsed["majority_none_vs_some_accuracy"] == pytest.approx(2 / 3)
    empty = stg.selection_accuracy([], labels)
    assert empty["exact_accuracy"] is None and empty["none_vs_some_accuracy"] is None
    assert empty["always_none_exact_accuracy"] is None


def test_select_then_generate_with_a_tiny_model(
    tiny_llama_dir: Path, sample: list[Dialogue]
) -> None:
    from persona_align.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_llama_dir))
    params = GenerationParams(max_new_tokens=6)
    text = PALDataConfig(response_format="text", word_limit=30)
    candidates, selections = stg.select_then_generate(
        sample[:3], model, tokenizer, params, batch_size=2, config=text
    )
    assert [c.dialogue_id for c in candidates] == [d.id for d in sample[:3]]
    assert [s.dialogue_id for s in selections] == [d.id for d in sample[:3]]
    for c, s, d in zip(candidates, selections, sample[:3], strict=True):
        assert c.responder == "pal-stg"
        assert s.index == stg.match_persona(s.raw, d.persona)[0]
        assert c.prompt_hash == messages_hash(persona_messages(d, s.selected, "text", 30))
        assert c.valid == bool(c.raw.strip())
    from persona_align.inference.engine import (
        Conversation,
        Engine,
        ReplyError,
        ReplyParams,
        make_policy,
    )

    policy = make_policy("select-then-generate", Engine(model, tokenizer, "tiny"), config=text)
    conversation = Conversation(persona=sample[0].persona, context=sample[0].context)
    reply = policy.reply(conversation, ReplyParams(max_tokens=6))
    _, raw, _ = stg.select_then_generate_one(
        model, tokenizer, sample[0].persona, sample[0].context, params, config=text
    )
    assert reply.raw == raw and reply.policy == "select-then-generate"
    assert reply.completion_tokens > 0 and reply.prompt_tokens > 0
    with pytest.raises(ReplyError, match="persona"):
        policy.validate(Conversation(persona=[], context=sample[0].context))
