"""Reference-based and diversity metrics against values worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from persona_align.errors import InputError
from persona_align.metrics.base import METRICS, ScoreItem, Unavailable, make_metric
from persona_align.metrics.bertscore import BERTScore
from persona_align.metrics.lexical import corpus_distinct, parlai_normalize, tokenize
from persona_align.metrics.scorer import prepare_metrics
from persona_align.metrics.similarity import SBSSimilarity
from persona_align.records import Candidate, Dialogue, Turn


def item(response: str, reference: str | None, dialogue_id: str = "d1") -> ScoreItem:
    dialogue = Dialogue(
        id=dialogue_id,
        persona=["I have a cat."],
        context=[Turn(speaker="User1", text="Tell me about your pet.")],
        reference=reference,
    )
    candidate = Candidate(
        dialogue_id=dialogue_id, responder="test", raw=response, response=response, valid=True
    )
    return ScoreItem(dialogue, candidate)


def value(name: str, response: str, reference: str | None = None, **options: object) -> float:
    result = make_metric(name, **options).score([item(response, reference)])[0]
    assert result is not None
    return result


REF = "The cat sat on the mat"


def test_registry_flags() -> None:
    for name in ("bleu-1", "bleu-2", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "meteor", "f1"):
        assert METRICS[name].needs_reference, name
        assert METRICS[name].failure_value == 0.0, name
    for name in ("dist-1", "dist-2"):
        assert not METRICS[name].needs_reference
        assert METRICS[name].failure_value == 0.0
    for name in ("bertscore", "sbs-sim"):
        assert METRICS[name].needs_reference and METRICS[name].failure_value == 0.0
    assert "WordNet" in METRICS["meteor"].description


def test_tokenize_english_and_chinese() -> None:
    assert tokenize("Don't stop, OK?") == ["don't", "stop", ",", "ok", "?"]
    assert tokenize("Ｈｅｌｌｏ！") == ["hello", "!"]  # full-width forms are NFKC-normalised
    assert tokenize("我喜欢吃苹果") == ["我", "喜欢", "吃", "苹果"]  # jieba words, not characters
    assert tokenize("我喜欢Python!") == ["我", "喜欢", "python", "!"]


def test_bleu_by_hand() -> None:
    # hyp "the cat is on the mat" vs ref "the cat sat on the mat", both 6 tokens so BP = 1.
    # unigrams: the (twice), cat, on, mat match (clipped) → p1 = 5/6
    # bigrams: "the cat", "on the", "the mat" of 5 → p2 = 3/5
    # BLEU-1 = 5/6; BLEU-2 = sqrt(5/6 · 3/5) = sqrt(1/2)
    hyp = "The cat is on the mat"
    assert value("bleu-1", hyp, REF) == pytest.approx(5 / 6)
    assert value("bleu-2", hyp, REF) == pytest.approx(math.sqrt(0.5))
    # hyp "the cat sat" (3 tokens) vs 6: p1 = 1, BP = exp(1 - 6/3) = e^-1
    assert value("bleu-1", "the cat sat", REF) == pytest.approx(math.exp(-1))
    # p1 = p2 = p3 = p4 = 1 for an exact copy
    assert value("bleu-4", REF, REF) == pytest.approx(1.0)
    # no shared unigram at all → 0 (smoothing only rescues higher orders)
    assert value("bleu-4", "dogs bark loudly", REF) == 0.0


def test_bleu4_smoothing_keeps_partial_matches_above_zero() -> None:
    # "the cat is on the mat" has no matching 4-gram; method1 counts it as 0.1 / 3.
    # p = 5/6, 3/5, 1/4 ("on the mat"), 0.1/3 → BLEU-4 = (5/6 · 3/5 · 1/4 · 0.1/3)^(1/4)
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert value("bleu-4", "the cat is on the mat", REF) == pytest.approx(expected)


def test_rouge_by_hand() -> None:
    # "the cat sat" vs 6-token ref: ROUGE-1 P = 3/3, R = 3/6 → F = 2/3
    # ROUGE-2: both hyp bigrams match, ref has 5 → P = 1, R = 2/5 → F = 2·0.4/1.4 = 4/7
    # ROUGE-L: LCS = 3 → same as ROUGE-1
    assert value("rouge-1", "the cat sat", REF) == pytest.approx(2 / 3)
    assert value("rouge-2", "the cat sat", REF) == pytest.approx(4 / 7)
    assert value("rouge-l", "the cat sat", REF) == pytest.approx(2 / 3)
    # "the cat is on the mat": 5/6 unigrams, 3/5 bigrams, LCS "the cat on the mat" = 5
    assert value("rouge-1", "the cat is on the mat", REF) == pytest.approx(5 / 6)
    assert value("rouge-2", "the cat is on the mat", REF) == pytest.approx(3 / 5)
    assert value("rouge-l", "the cat is on the mat", REF) == pytest.approx(5 / 6)


def test_rouge_keeps_chinese() -> None:
    # rouge-score's own tokenizer drops non-ASCII text (every score would be 0)
    # 我/喜欢/吃 of 4 words match → F = 3/4
    assert value("rouge-1", "我喜欢吃苹果", "我喜欢吃香蕉") == pytest.approx(0.75)


def test_meteor_exact_and_stem_without_wordnet() -> None:
    # 6 matches in one chunk: F-mean 1, penalty 0.5 · (1/6)^3
    assert value("meteor", REF, REF) == pytest.approx(1 - 0.5 / 6**3)
    assert value("meteor", "dogs bark loudly", REF) == 0.0
    # "cats" ↔ "cat" by Porter stem; 3 matches, one chunk → 1 - 0.5 · (1/3)^3
    assert value("meteor", "the cats sat", "the cat sat") == pytest.approx(1 - 0.5 / 27)


def test_f1_parlai_normalisation() -> None:
    assert parlai_normalize("The cat, a dog!") == "cat dog"
    # pred [cat, dog] vs gold [cat, and, dog]: 2 shared → P = 1, R = 2/3 → F1 = 0.8
    assert value("f1", "The cat, a dog!", "cat and dog.") == pytest.approx(0.8)
    assert value("f1", "The THE the.", "a an") == 0.0  # nothing left but articles


def test_f1_chinese_on_words() -> None:
    # jieba: 我/喜欢/吃/苹果 vs 我/喜欢/吃/香蕉 → 3 of 4 words → F1 = 0.75
    # (on characters it would be 4 of 6 → 0.667); "。" is stripped as punctuation
    assert value("f1", "我喜欢吃苹果。", "我喜欢吃香蕉") == pytest.approx(0.75)


def test_distinct_by_hand() -> None:
    reply = "I like cats and I like dogs"
    # unigrams: i, like, cats, and, i, like, dogs → 5 distinct / 7
    assert value("dist-1", reply) == pytest.approx(5 / 7)
    # bigrams: i-like, like-cats, cats-and, and-i, i-like, like-dogs → 5 distinct / 6
    assert value("dist-2", reply) == pytest.approx(5 / 6)
    assert value("dist-2", "hello") == 0.0  # no bigram at all
    assert value("dist-1", "我喜欢你，你喜欢我") == pytest.approx(4 / 7)  # 我 喜欢 你 , 你 喜欢 我


def test_corpus_distinct_by_hand() -> None:
    # unigrams a, b | a, b, c → 3 distinct / 5
    assert corpus_distinct(["a b", "a b c"], 1) == pytest.approx(3 / 5)
    # bigrams a-b | a-b, b-c → 2 distinct / 3 (no "b a" across the two replies)
    assert corpus_distinct(["a b", "a b c"], 2) == pytest.approx(2 / 3)
    assert corpus_distinct([], 1) == 0.0


def test_empty_reply_scores_zero() -> None:
    for name in ("bleu-1", "bleu-4", "rouge-l", "meteor", "f1"):
        assert value(name, "", REF) == 0.0, name
    assert value("dist-1", " ") == 0.0


def test_lexical_metrics_take_no_options() -> None:
    with pytest.raises(InputError, match="no option"):
        make_metric("bleu-2", smoothing=7)


# --- bertscore ----------------------------------------------------------------------------

MINILM = "embedded-minilm"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with MiniLM's tokenizer, saved as a local checkpoint directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from persona_align.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(MINILM).location)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bertscore_identical_is_one(tiny_bert: Path) -> None:
    metric = make_metric("bertscore", model=str(tiny_bert), batch_size=2)
    metric.load()
    values = metric.score(
        [
            item("I love my cat.", "I love my cat."),
            item("The weather is nice today.", "The weather is nice today."),
            item("Completely different words here.", "I love my cat."),
            item("", "I love my cat."),
        ]
    )
    assert values[0] == pytest.approx(1.0, abs=1e-4)
    assert values[1] == pytest.approx(1.0, abs=1e-4)
    assert values[2] is not None and values[2] < 0.999
    assert values[3] == 0.0  # nothing to match


def test_bertscore_options(tiny_bert: Path) -> None:
    metric = make_metric("bertscore", model=str(tiny_bert))
    assert metric.model == str(tiny_bert)
    metric.load()
    assert metric.settings()["num_layers"] == 2  # default: every layer of the model

    one = make_metric("bertscore", model=str(tiny_bert), num_layers=1)
    one.load()
    assert len(one._scorer._model.encoder.layer) == 1
    assert one.settings() != metric.settings()

    with pytest.raises(InputError, match="exceeds"):
        make_metric("bertscore", model=str(tiny_bert), num_layers=3).load()
    with pytest.raises(InputError, match="positive"):
        make_metric("bertscore", batch_size=0)
    with pytest.raises(InputError, match="unexpected"):
        make_metric("bertscore", rescale=True)


def test_bertscore_idf(tiny_bert: Path) -> None:
    dialogues = [item("x", "I love my cat.").dialogue, item("x", "My cat sleeps.", "d2").dialogue]
    metric = BERTScore(model=str(tiny_bert), idf=True)
    metric.fit(dialogues)
    metric.load()
    assert isinstance(metric.settings()["idf"], str)  # keyed by the idf corpus
    assert metric.score([item("My cat sleeps.", "My cat sleeps.")])[0] == pytest.approx(
        1.0, abs=1e-4
    )
    no_refs = BERTScore(model=str(tiny_bert), idf=True)
    no_refs.fit([item("x", None).dialogue])
    with pytest.raises(Unavailable, match="gold"):
        no_refs.load()


@pytest.mark.parametrize("name", ["bertscore", "sbs-sim"])
def test_unresolvable_model_is_unavailable(name: str) -> None:
    metric = make_metric(name, model="/nonexistent/model-dir")
    with pytest.raises(Unavailable, match="neither a directory nor a hub id"):
        metric.load()
    status = prepare_metrics([make_metric(name, model="embedded-nope")], [])[0]
    assert not status.available and "embedded-nope" in (status.reason or "")


# --- sbs-sim ------------------------------------------------------------------------------


def test_sbs_similarity_with_embedded_minilm() -> None:
    metric = SBSSimilarity(batch_size=4)
    metric.load()
    calls: list[list[str]] = []
    encode = metric._encoder.encode

    def spy(texts: list[str], **kwargs: object) -> object:
        calls.append(list(texts))
        return encode(texts, **kwargs)

    metric._encoder.encode = spy
    ref = "I love playing football on weekends."
    values = metric.score(
        [
            item(ref, ref),
            item("On weekends I really enjoy playing soccer.", ref),
            item("The stock market fell sharply today.", ref),
            item("   ", ref),
        ]
    )
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert values[1] is not None and values[2] is not None
    assert values[1] > values[2]
    assert values[3] == 0.0
    # each distinct text once (the gold turn repeats), blank replies not at all
    assert calls == [
        [ref, "On weekends I really enjoy playing soccer.", "The stock market fell sharply today."]
    ]
