"""Coherence (coh-unieval, coh-smollm2) and P score on small models built offline, and the
cache keys of every model-backed metric here (BERTScore and SBS similarity too)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from persona_align.metrics.base import ScoreItem, Unavailable
from persona_align.metrics.coherence import CohLLMJudge, CohUniEval
from persona_align.metrics.persona_distance import PersonaDistance, content_words
from persona_align.prompting import shared_prefix
from persona_align.records import Candidate, Dialogue, Turn

TEXT = (
    "hello there how are you doing today i like hiking in the mountains with my two dogs "
    "we went fishing at the lake last summer do enjoy cooking pasta on weekends what is "
    "your favourite book music film city"
)
WORDS = TEXT.split()


def make_item(persona: list[str], context: list[str], response: str) -> ScoreItem:
    turns = [Turn(speaker=f"User{k % 2 + 1}", text=text) for k, text in enumerate(context)]
    dialogue = Dialogue(id="d", persona=persona, context=turns)
    raw = json.dumps({"response": response})
    return ScoreItem(
        dialogue, Candidate(dialogue_id="d", responder="r", raw=raw, response=response, valid=True)
    )


def random_items(count: int, seed: int = 0) -> list[ScoreItem]:
    """Items of very different lengths, so batches carry real padding."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(2, 12))) + rng.choice([".", "?", "!"])

    return [
        make_item([sentence()], [sentence() for _ in range(rng.randint(1, 4))], sentence())
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 with a word-level tokenizer holding T5's special tokens, Yes and No."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    question = "question: Is this a coherent response given the dialogue history? response: dialogue history:"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "Yes": 3, "No": 4}
    for word in re.findall(r"\w+|[^\w\s]", " ".join([question, *WORDS, ". ? !"])):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    folder = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_unieval_input_is_unievals_format(tiny_t5_dir: Path) -> None:
    item = make_item(["I like dogs."], ["Hi there!", "How are\nyou?"], "Fine, thanks.")
    metric = CohUniEval(model=str(tiny_t5_dir))
    assert metric.inputs([item]) == [
        "question: Is this a coherent response given the dialogue history? </s> "
        "response: Fine, thanks. </s> dialogue history: Hi there! \n How are you? \n\n"
    ]
    metric.load()
    ids = metric._tokenizer(metric.inputs([item]))["input_ids"][0]
    assert ids.count(metric._tokenizer.eos_token_id) == 3  # both separators and the end


def test_unieval_scores_do_not_depend_on_the_batch(tiny_t5_dir: Path) -> None:
    """PersoBench's scorer misaligned values after the 8th item of a batch: this catches it."""
    items = random_items(20)
    batched = CohUniEval(model=str(tiny_t5_dir), batch_size=16).score(items)
    single = CohUniEval(model=str(tiny_t5_dir), batch_size=1).score(items)
    assert all(0.0 < v < 1.0 for v in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len({round(v, 6) for v in batched}) == len(items)  # values are the items' own
    reordered = CohUniEval(model=str(tiny_t5_dir), batch_size=16).score(items[::-1])
    assert reordered[::-1] == pytest.approx(single, abs=1e-5)


def test_unieval_is_unavailable_when_the_model_cannot_be_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    with pytest.raises(Unavailable, match="cannot load"):
        CohUniEval(model=str(tmp_path)).load()  # an empty folder
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Unavailable, match="not in the local hub cache"):
        CohUniEval().load()


def test_llm_judge_batched_equals_one_by_one(tiny_llama_dir: Path) -> None:
    items = random_items(7, seed=1)
    batched = CohLLMJudge(model=str(tiny_llama_dir), batch_size=4).score(items)
    single = CohLLMJudge(model=str(tiny_llama_dir), batch_size=1).score(items)
    assert all(0.0 < v < 1.0 for v in batched)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len({round(v, 7) for v in batched}) > 1
    prompt = CohLLMJudge(model=str(tiny_llama_dir)).prompts(items[:1])[0]
    assert "Is this a coherent response given the dialogue history? Answer Yes or No." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_llm_judge_shared_history_prefix_gives_the_unshared_values(tiny_llama_dir: Path) -> None:
    rng = random.Random(3)
    items = []
    for dialogue_id in ("a", "b"):
        turns = [Turn(speaker=f"User{k % 2 + 1}", text=" ".join(rng.choices(WORDS, k=12)))
                 for k in range(4)]  # fmt: skip
        dialogue = Dialogue(id=dialogue_id, persona=["I hike."], context=turns)
        for k in range(4 if dialogue_id == "a" else 2):
            reply = " ".join(rng.choices(WORDS, k=2 + 5 * k))
            candidate = Candidate(dialogue_id=dialogue_id, responder=f"r{k}", raw=reply,
                                  response=reply, valid=True)  # fmt: skip
            items.append(ScoreItem(dialogue, candidate))
    shared = CohLLMJudge(model=str(tiny_llama_dir), batch_size=3).score(items)
    plain = CohLLMJudge(model=str(tiny_llama_dir), share_prefix=False).score(items)
    assert shared == pytest.approx(plain, abs=1e-5)
    assert len({round(v, 7) for v in shared}) == len(items)


def test_shared_prefix_leaves_every_row_a_token() -> None:
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[7], [7, 8]]) == 0


def test_content_words_drop_stopwords_punctuation_and_case() -> None:
    assert content_words("I don't love my Dog.") == ["love", "dog"]
    assert content_words("Is it? Yes, it is!") == ["yes"]


@pytest.fixture(scope="module")
def word_vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gensim.models import KeyedVectors

    keyed = KeyedVectors(vector_size=3)
    keyed.add_vectors(
        ["love", "dog", "cat", "pizza"],
        np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float32),
    )
    folder = tmp_path_factory.mktemp("vectors")
    keyed.save_word2vec_format(str(folder / "vectors.txt"), binary=False)
    keyed.save_word2vec_format(str(folder / "vectors.bin"), binary=True)
    return folder


@pytest.mark.parametrize("filename", ["vectors.txt", "vectors.bin"])
def test_p_word2vec_is_the_cosine_of_mean_vectors(word_vectors: Path, filename: str) -> None:
    metric = PersonaDistance(backend="word2vec", vectors=str(word_vectors / filename))
    metric.load()
    persona = ["I love my dog."]  # love, dog
    values = metric.score(
        [
            make_item(persona, ["Hi!"], "The cat eats pizza!"),  # cat, pizza ("eats" is OOV)
            make_item(persona, ["Hi!"], "Wow, hmm!"),  # no in-vocabulary word
            make_item(persona, ["Hi!"], "My dog loves love."),  # dog, love; "loves" is OOV
        ]
    )
    # mean(love, dog) = (.5, .5, 0); mean(cat, pizza) = (.5, .5, 1): cosine = .5 / sqrt(.5 * 1.5)
    assert values[0] == pytest.approx(1 / math.sqrt(3))
    assert values[1] == 0.0
    assert values[2] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def static_vectors_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer BERT whose input embeddings are set by hand; "dogs" is dog + ##s."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    rows = {
        "[PAD]": [0, 0, 0, 0],
        "[UNK]": [5, 5, 5, 5],
        "[CLS]": [0, 0, 0, 0],
        "[SEP]": [0, 0, 0, 0],
        "love": [1, 0, 0, 0],
        "dog": [0, 1, 0, 0],
        "cat": [0, 1, 1, 0],
        "pizza": [1, 0, 1, 0],
        "##s": [0, 0, 0, 2],
    }
    vocab = {word: index for index, word in enumerate(rows)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
    )
    model = BertModel(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.tensor(list(rows.values())))
    folder = tmp_path_factory.mktemp("static-vectors")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_p_static_is_the_cosine_of_mean_piece_vectors(static_vectors_dir: Path) -> None:
    metric = PersonaDistance(backend="static", model=str(static_vectors_dir))
    assert PersonaDistance().backend == "static"  # the offline default
    metric.load()
    persona = ["I love my dog."]  # love, dog: mean (.5, .5, 0, 0)
    values = metric.score(
        [
            make_item(persona, ["Hi!"], "The cat eats pizza!"),  # "eats" is all [UNK]: skipped
            make_item(persona, ["Hi!"], "Wow, hmm!"),  # no word with a vector
            make_item(persona, ["Hi!"], "Dogs!"),  # dog + ##s: (0, .5, 0, 1)
        ]
    )
    # mean(cat, pizza) = (.5, .5, 1, 0): cosine = .5 / sqrt(.5 * 1.5)
    assert values[0] == pytest.approx(1 / math.sqrt(3))
    assert values[1] == 0.0
    # (.5, .5, 0, 0) . (0, .5, 0, 1) = .25; norms sqrt(.5) and sqrt(1.25)
    assert values[2] == pytest.approx(0.25 / math.sqrt(0.5 * 1.25))
    assert metric.settings()["backend"] == "static"


def test_p_static_reads_vectors_of_an_encoder_on_a_gpu(static_vectors_dir: Path, monkeypatch):
    """Regression: the piece vectors came back with ``.numpy()`` on the encoder's device, which
    crashed wherever sentence-transformers had put the encoder on cuda/mps."""
    import types

    import torch

    class OnDevice(torch.Tensor):  # a tensor that, like a cuda one, refuses numpy() until .cpu()
        def numpy(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor)

    metric = PersonaDistance(backend="static", model=str(static_vectors_dir))
    metric.load()
    model = metric._encoder[0].auto_model
    table = model.get_input_embeddings().weight.detach().as_subclass(OnDevice)
    monkeypatch.setattr(model, "get_input_embeddings", lambda: types.SimpleNamespace(weight=table))
    values = metric.score([make_item(["I love my dog."], ["Hi!"], "Dogs!")])
    assert values[0] == pytest.approx(0.25 / math.sqrt(0.5 * 1.25))


def test_p_word2vec_without_vectors_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="needs the option vectors"):
        PersonaDistance(backend="word2vec").load()
    with pytest.raises(Unavailable, match="not found"):
        PersonaDistance(backend="word2vec", vectors=str(tmp_path / "missing.bin")).load()


def test_p_sentence_backend_with_embedded_minilm() -> None:
    metric = PersonaDistance(backend="sentence")
    metric.load()
    persona = ["I love hiking in the mountains.", "I have two dogs."]
    same, related, unrelated, empty = metric.score(
        [
            make_item(
                ["I love hiking in the mountains."], ["Hi!"], "I love hiking in the mountains."
            ),
            make_item(persona, ["Hi!"], "We walked the dogs along a mountain trail yesterday."),
            make_item(persona, ["Hi!"], "The stock market fell sharply on Tuesday."),
            make_item(persona, ["Hi!"], "Is it? It is!"),
        ]
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert related > unrelated
    assert empty == 0.0


def _weights_file(folder: Path) -> Path:
    return (
        folder / "vectors.txt"
        if (folder / "vectors.txt").exists()
        else folder / "model.safetensors"
    )


def _retrain(folder: Path) -> None:
    """Different weights saved into the same folder, under the same file name."""
    path = _weights_file(folder)
    if path.suffix == ".txt":
        path.write_text(path.read_text().replace("love 1", "love 2", 1))
        return
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = sorted(tensors)[0]
    save_file(tensors | {name: tensors[name] + 0.5}, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("metric", "options", "source"),
    [
        ("coh-unieval", {}, "tiny_t5_dir"),
        ("coh-smollm2", {}, "tiny_llama_dir"),
        ("p", {"backend": "static"}, "static_vectors_dir"),
        ("p", {"backend": "sentence"}, "static_vectors_dir"),
        ("p", {"backend": "word2vec"}, "word_vectors"),
        ("bertscore", {}, "static_vectors_dir"),
        ("sbs-sim", {}, "static_vectors_dir"),
    ],
)
def test_cache_key_follows_the_weights_bytes(
    metric: str,
    options: dict[str, str],
    source: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retraining into the same folder must not reuse old scores; saving the same weights
    again (new file times) must."""
    from persona_align.metrics import make_metric

    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(request.getfixturevalue(source), tmp_path / "model")
    where = (
        {"vectors": str(folder / "vectors.txt")}
        if metric == "p" and source == "word_vectors"
        else {"model": str(folder)}
    )

    def key() -> str:  # what the scorer keys cached values on
        instance = make_metric(metric, **options, **where)
        instance.load()
        return json.dumps(instance.settings(), sort_keys=True)

    first = key()
    weights = _weights_file(folder)
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(10**18, 10**18))
    assert key() == first
    _retrain(folder)
    assert key() != first
