"""SBS data: noun slots, fillers, scoring, score-conditioned SFT examples, inference prompts."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from persona_align.errors import InputError
from persona_align.preference.sbs import (
    TASK,
    Filler,
    MetricScorer,
    SBSConfig,
    Slot,
    append_score,
    build_sbs_dataset,
    find_slots,
    format_score,
    load_spacy,
    make_filler,
    sbs_messages,
)
from persona_align.preference.sbs.fillers import ChatFiller, clean_fill
from persona_align.prompting import extract_response, persobench_prompt
from persona_align.records import Dialogue, Message, SFTExample


def dialogue(id_: str, reference: str | None) -> Dialogue:
    return Dialogue(
        id=id_,
        persona=["I keep bees in my garden.", "My dog is called Rex."],
        context=[{"speaker": "User1", "text": "What do you do on weekends?"}],
        reference=reference,
    )


DIALOGUES = [
    dialogue("a", "I walk my dog in the park and check the bees."),
    dialogue("b", "Hi there, how are you?"),  # no noun
    dialogue("c", None),  # no gold turn: skipped
    dialogue("d", "My sister sells honey at the market on Sundays."),
]


class DictFiller(Filler):
    """Proposals from a table, so that the builder's choices can be checked exactly."""

    name = "dict"

    def __init__(self, table: dict[str, list[str]], default: Sequence[str] = ("zebra",)) -> None:
        self.table, self.default = table, list(default)
        self.seen: list[Slot] = []

    def fill(self, slots: Sequence[Slot]) -> list[list[str]]:
        self.seen += slots
        return [list(self.table.get(slot.noun, self.default)) for slot in slots]


class FixedScorer:
    """Scores each augmentation by a table lookup on the replacing word."""

    def __init__(self, values: dict[str, float | None], default: float = 0.8734) -> None:
        self.values, self.default = values, default
        self.loaded_with: list[str] = []

    def settings(self) -> dict[str, Any]:
        return {"name": "fixed"}

    def load(self, dialogues: Sequence[Dialogue]) -> None:
        self.loaded_with = [d.id for d in dialogues]

    def score(self, items: Sequence[tuple[Dialogue, str]]) -> list[float | None]:
        out = []
        for d, text in items:
            changed = set(text.split()) - set((d.reference or "").split())
            word = next(iter(changed), "").strip(".,?!")
            out.append(self.values.get(word, self.default))
        return out


def build(
    filler: Filler | None = None, scorer: Any = None, dialogues=DIALOGUES, **config: Any
) -> tuple[list[SFTExample], dict[str, Any]]:
    return build_sbs_dataset(
        dialogues,
        SBSConfig(**config),
        filler=filler or DictFiller({}),
        scorer=scorer or FixedScorer({}),
    )


def changed_spans(original: str, augmented: str) -> list[tuple[str, str]]:
    """The (old, new) character spans where two texts differ, word-aligned."""
    a, b = original.split(" "), augmented.split(" ")
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return [
        (" ".join(a[i1:i2]), " ".join(b[j1:j2])) for tag, i1, i2, j1, j2 in ops if tag != "equal"
    ]


# --- noun detection -------------------------------------------------------------------------


def test_nouns_found_with_the_real_spacy_model() -> None:
    texts = [
        "I walked my dog to the park yesterday.",
        "hi there how are you",
        "My e-mail is 50% full.",
        "Dogs and cats love London.",
    ]
    slots = find_slots(load_spacy("embedded-spacy"), texts)
    assert [[(s.noun, s.tag) for s in found] for found in slots] == [
        [("dog", "NN"), ("park", "NN"), ("yesterday", "NN")],
        [],
        [],  # pieces of "e-mail" and the "%" symbol are not replaceable words
        [("Dogs", "NNS"), ("cats", "NNS"), ("London", "NNP")],
    ]
    for text, found in zip(texts, slots, strict=True):
        for slot in found:
            assert text[slot.start : slot.end] == slot.noun


def test_replacement_keeps_sentence_case() -> None:
    slot = Slot("Dogs bark.", 0, 4, "NNS")
    assert slot.replaced("cats") == "Cats bark."
    assert Slot("I like dogs.", 7, 11, "NNS").replaced("cats") == "I like cats."


# --- augmentation ---------------------------------------------------------------------------


def test_each_augmentation_changes_exactly_one_noun() -> None:
    filler = DictFiller({}, default=["zebra"])
    examples, summary = build(filler)
    by_id: dict[str, list[SFTExample]] = {}
    for ex in examples:
        by_id.setdefault(ex.dialogue_id, []).append(ex)
    assert set(by_id) == {"a", "b", "d"}
    for did, group in by_id.items():
        original = next(d.reference for d in DIALOGUES if d.id == did)
        assert group[0].meta["kind"] == "original"
        assert extract_response(group[0].completion[0].content) == original
        nouns = [s.noun for s in filler.seen if s.text == original]
        augmented = group[1:]
        assert [ex.meta["noun"] for ex in augmented] == nouns
        for ex in augmented:
            text = extract_response(ex.completion[0].content)
            assert changed_spans(original, text) == [
                (original[ex.meta["start"] :].split(" ")[0], text[ex.meta["start"] :].split(" ")[0])
            ]
            fill = "Zebra" if ex.meta["noun"][0].isupper() else "zebra"  # "Sundays"
            start, end = ex.meta["start"], ex.meta["start"] + len(ex.meta["noun"])
            assert text == original[:start] + fill + original[end:]
            assert ex.task == TASK
    assert [ex.meta["noun"] for ex in by_id["a"][1:]] == ["dog", "park", "bees"]
    assert summary["augmentations"] == summary["nouns_found"] == len(filler.seen) == 7


def test_equal_fills_are_skipped_and_counted() -> None:
    filler = DictFiller({"dog": ["DOG", "cat"], "park": ["Park"], "bees": ["wasps", "bees"]})
    examples, summary = build(filler, dialogues=DIALOGUES[:1])
    fills = {ex.meta["noun"]: ex.meta["fill"] for ex in examples[1:]}
    assert fills == {"dog": "cat", "bees": "wasps"}  # park had only itself to offer
    assert summary["skipped_equal_fills"] == 2  # DOG and Park; "bees" ranked below the pick
    assert summary["nouns_without_fill"] == 1
    assert summary["augmentations"] == 2

    _, random_summary = build(filler, dialogues=DIALOGUES[:1], pick="random")
    assert random_summary["skipped_equal_fills"] == 3  # random picks look at every proposal


def test_responses_without_nouns_and_dialogues_without_reference_are_counted() -> None:
    examples, summary = build()
    assert summary["dialogues"] == 4
    assert summary["dialogues_without_reference"] == 1
    assert summary["responses"] == 3
    assert summary["responses_without_nouns"] == 1
    assert summary["originals"] == 3
    assert [ex.dialogue_id for ex in examples if ex.meta["kind"] == "original"] == ["a", "b", "d"]
    assert not any(ex.dialogue_id == "c" for ex in examples)


def test_max_augmentations_and_originals_switch() -> None:
    examples, summary = build(max_augmentations=1, include_originals=False)
    assert summary["nouns_masked"] == 2 and summary["nouns_found"] == 7
    assert summary["originals"] == 0
    assert [ex.meta["kind"] for ex in examples] == ["augmented", "augmented"]


def test_same_seed_same_data_other_seed_other_choices() -> None:
    many = [
        dialogue(
            f"x{i}", "My cousin in Paris bakes bread, cakes and pies for the shop every morning."
        )
        for i in range(6)
    ]
    filler = DictFiller({}, default=["apple", "river", "stone", "cloud"])

    def run(seed: int) -> list[str]:
        examples, _ = build(filler, dialogues=many, max_augmentations=2, pick="random", seed=seed)
        return [ex.model_dump_json() for ex in examples]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert len(first) == 6 * 3


# --- scores and prompts ---------------------------------------------------------------------


def test_scores_rounded_and_appended_to_the_last_user_turn() -> None:
    scorer = FixedScorer({"cat": 0.8734, "lawn": 0.996, "wasps": -0.001, "wolf": None})
    filler = DictFiller({"dog": ["cat"], "park": ["lawn"], "bees": ["wasps"]})
    examples, summary = build(filler, scorer, dialogues=[DIALOGUES[0]], system="Stay in character.")
    by_fill = {ex.meta.get("fill"): ex for ex in examples}
    expected = {None: "1.0", "cat": "0.87", "lawn": "0.99", "wasps": "0.0"}
    for fill, shown in expected.items():
        prompt = by_fill[fill].prompt
        assert [m.role for m in prompt] == ["system", "user"]
        base = persobench_prompt(DIALOGUES[0])
        assert prompt[-1].content == base.rstrip() + f"\nScore: {shown}"
        assert by_fill[fill].meta["score"] == float(shown)
    assert by_fill["cat"].meta["raw_score"] == 0.8734
    assert summary["scores_capped"] == 1  # 0.996 rounds to 1.0, above max_augmented_score
    assert scorer.loaded_with == ["a"]
    assert (summary["score_min"], summary["score_max"]) == (0.0, 0.99)

    filler = DictFiller({"dog": ["wolf"], "park": ["cat"], "bees": ["cat"]})
    _, summary = build(filler, scorer, dialogues=[DIALOGUES[0]])
    assert summary["unscored"] == 1 and summary["augmentations"] == 2


def test_text_completion_format() -> None:
    examples, _ = build(dialogues=[DIALOGUES[0]], response_format="text")
    assert examples[0].completion == [Message(role="assistant", content=DIALOGUES[0].reference)]


def test_inference_prompt_asks_for_the_top_score() -> None:
    messages = sbs_messages(DIALOGUES[0])
    assert messages[-1].role == "user"
    assert messages[-1].content.endswith("}\nScore: 1.0")
    assert messages[-1].content.startswith(persobench_prompt(DIALOGUES[0]).rstrip())
    convo = [
        Message(role="user", content="hello"),
        Message(role="assistant", content="hi"),
        Message(role="user", content="how are you? "),
        Message(role="assistant", content="(prefill)"),
    ]
    out = append_score(convo, 0.5)
    assert out[2].content == "how are you?\nScore: 0.5"
    assert [m.content for m in out[:2]] == ["hello", "hi"] and convo[2].content == "how are you? "
    assert [format_score(s) for s in (1.0, 0.9, 0.874, -0.0001)] == ["1.0", "0.9", "0.87", "0.0"]


def test_config_rejects_unknown_keys_and_names() -> None:
    with pytest.raises(ValidationError):
        SBSConfig(fillr="neighbour")
    with pytest.raises(InputError, match="unknown SBS filler 'bart'"):
        make_filler("bart")
    with pytest.raises(InputError, match="SBS filler 'neighbour'"):
        make_filler("neighbour", modle="x")
    with pytest.raises(InputError, match="unknown SBS scorer 'p'"):
        MetricScorer("p")  # persona distance does not compare with a reference


# --- fillers on real (tiny or embedded) models ----------------------------------------------


def _save_biased(
    model: Any, tokenizer: Any, bias: Any, folder: Path, favourites: list[str]
) -> None:
    """Make ``favourites`` the top predictions at every position, in that order."""
    import torch

    with torch.no_grad():
        for rank, word in enumerate(favourites):
            bias[..., tokenizer.convert_tokens_to_ids(word)] = 100.0 - rank
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_mask_lm_filler_with_a_tiny_bert(tmp_path: Path, minilm_tokenizer: Any) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(minilm_tokenizer), hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    model = BertForMaskedLM(config)
    _save_biased(
        model,
        minilm_tokenizer,
        model.get_output_embeddings().bias,
        tmp_path,
        ["the", "dog", "banana"],
    )
    filler = make_filler("mask-lm", model=str(tmp_path), candidates=2)
    examples, summary = build(filler, dialogues=[DIALOGUES[0]])
    # "the" is a stop word; "dog" is proposed for every noun and skipped where it is the noun.
    assert [(ex.meta["noun"], ex.meta["fill"]) for ex in examples[1:]] == [
        ("dog", "banana"),
        ("park", "dog"),
        ("bees", "dog"),
    ]
    assert summary["skipped_equal_fills"] == 1


def test_mask_lm_filler_with_a_tiny_bart(tmp_path: Path, minilm_tokenizer: Any) -> None:
    """BART, the SBS paper's filler: its masked-LM head is the seq2seq model's decoder output."""
    from transformers import BartConfig, BartForConditionalGeneration

    tok = minilm_tokenizer
    config = BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.sep_token_id,
    )  # fmt: skip
    model = BartForConditionalGeneration(config)
    _save_biased(model, tok, model.final_logits_bias, tmp_path, ["banana", "apple"])
    filler = make_filler("mask-lm", model=str(tmp_path))
    filler.load([])
    slots = find_slots(load_spacy(), ["I walk my dog in the park."])[0]
    assert filler.fill(slots) == [["banana", "apple"], ["banana", "apple"]]


def test_mask_lm_filler_reports_an_unreachable_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match=r"facebook/bart-large.*not in the local hub cache"):
        make_filler("mask-lm").load([])


def test_neighbour_filler_with_the_embedded_minilm() -> None:
    filler = make_filler("neighbour", candidates=3)
    filler.load(
        [("piano", "NN"), ("cat", "NN"), ("dog", "NN"), ("cats", "NNS"), ("dogs", "NNS"),
         ("puppy", "NN"), ("tax", "NN")]
    )  # fmt: skip
    slots = find_slots(load_spacy(), ["My dog sleeps.", "I love dogs.", "I met Rex."])
    assert [s[0].tag for s in slots] == ["NN", "NNS", "NNP"]
    single, plural, proper = filler.fill([s[0] for s in slots])
    assert single[:2] == ["puppy", "cat"]  # nearest by meaning first, never the noun itself
    assert len(single) == 3 and single[2] in {"piano", "tax"}
    assert plural == ["cats"]  # same tag only: plural for plural, never the noun itself
    assert len(proper) == 3  # no other proper noun: the nearest nouns of any tag


def test_default_config_runs_offline_end_to_end() -> None:
    """neighbour fills + MiniLM cosine: the defaults work with no hub access."""
    examples, summary = build_sbs_dataset(DIALOGUES, SBSConfig(max_augmentations=2))
    augmented = [ex for ex in examples if ex.meta["kind"] == "augmented"]
    assert summary["augmentations"] == len(augmented) == 4
    assert summary["filler"]["name"] == "neighbour" and summary["scorer"]["name"] == "sbs-sim"
    for ex in augmented:
        assert -1.0 <= ex.meta["score"] <= 0.99
        assert ex.meta["score"] == round(ex.meta["raw_score"], 2) or ex.meta["score"] == 0.99
        assert re.search(r"\nScore: -?\d\.\d{1,2}$", ex.prompt[-1].content)
    assert summary["score_mean"] is not None and summary["score_mean"] < 1.0


def test_chat_filler_prompt_and_parsing(tiny_llama_dir: Path) -> None:
    slot = find_slots(load_spacy(), ["I walk my dog daily."])[0][0]
    prompt = ChatFiller.prompt(slot)
    assert "I walk my ___ daily." in prompt and "dog" not in prompt
    assert [clean_fill(s) for s in (' "Cat". ', "the", "##ing", "", "cat food")] == [
        "Cat",
        None,
        None,
        None,
        "cat",
    ]
    filler = make_filler("chat", model=str(tiny_llama_dir), candidates=2)
    filler.load([])
    proposals = filler.fill([slot, slot])
    assert len(proposals) == 2 and proposals[0] == proposals[1]  # greedy beams: deterministic
    assert all(clean_fill(word) == word for words in proposals for word in words)


def test_sft_examples_round_trip(tmp_path: Path) -> None:
    from persona_align.records import read_records, write_records

    examples, _ = build()
    write_records(tmp_path / "sbs.jsonl", examples, SFTExample)
    assert read_records(tmp_path / "sbs.jsonl", SFTExample) == examples
    assert json.loads(examples[1].completion[0].content)["response"]
