"""Our judges: persona role in the records, the C and coherence judges' inputs, agreement
figures, `judge eval`, the LLM judge against the fake server, training and the metrics."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from persona_align.data import read_dialogues
from persona_align.errors import InputError
from persona_align.metrics import make_metric
from persona_align.metrics.base import ScoreItem
from persona_align.metrics.judges import (
    C_LABELS,
    agreement,
    c_item_pair,
    c_label_index,
    c_pair,
    c_value,
    cohen_kappa,
    read_judge_items,
)
from persona_align.metrics.llm_judge import LLMJudge, parse_label
from persona_align.prompting import persobench_prompt
from persona_align.records import Candidate, Dialogue, JudgeInput, JudgeItem, Turn, read_jsonl
from persona_align.testing.fake_server import FakeOpenAIServer

C_IDS = {0: "entailment", 1: "neutral", 2: "contradiction"}


def write_items(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(reply: str, label: int, role: str = "user", **extra) -> dict:
    return {"persona": "I love cats.I live in Paris.", "persona_role": role,
            "context": "User1: Hi!\nUser2: Hello.\nUser1: What should I see?", "reply": reply,
            "label": label, **extra}  # fmt: skip


# --- persona role ----------------------------------------------------------------------------


def test_persona_role_defaults_to_user_and_rejects_unknown_roles(tmp_path: Path, cli) -> None:
    base = {"id": "a", "persona": ["I like tea."], "context": [{"speaker": "User1", "text": "Hi"}]}
    assert Dialogue(**base).persona_role == "user"
    assert Dialogue(**base, persona_role="self").persona_role == "self"
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps(base) + "\n" + json.dumps(base | {"persona_role": "bot"}) + "\n")
    result = cli("data", "validate", bad)
    assert result.code == 2
    line = result.err.strip()
    assert "line 2" in line and "persona_role" in line and "'bot'" in line and "'self'" in line
    assert "\n" not in line


def test_readers_set_the_persona_role(tmp_path: Path, cli) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text('personas,context,act_response\n"I like tea.","User1: Hi","User2: Tea?"\n')
    assert read_dialogues("persobench-csv", csv)[0].persona_role == "user"
    assert read_dialogues("persobench-csv", csv, persona_role="self")[0].persona_role == "self"
    with pytest.raises(InputError, match="persona_role 'bot' is not one of user, self"):
        read_dialogues("persobench-csv", csv, persona_role="bot")
    out = tmp_path / "d.jsonl"
    result = cli("data", "import", "-f", "persobench-csv", csv, "-o", out,
                 "--opt", "persona_role=robot")  # fmt: skip
    assert result.code == 2 and "robot" in result.err and not out.exists()
    chat = tmp_path / "train_self_original.txt"
    chat.write_text("1 your persona: i like tea.\n2 hi there\thello , tea ?\n")
    assert {d.persona_role for d in read_dialogues("personachat", chat)} == {"self"}


def test_the_prompt_says_whose_persona_it_is() -> None:
    turn = [Turn(speaker="User1", text="Hi")]
    user = Dialogue(id="a", persona=["I like tea."], context=turn)
    own = Dialogue(id="a", persona=["I like tea."], context=turn, persona_role="self")
    assert "Participant Personas:\nI like tea." in persobench_prompt(user)  # PersoBench's words
    assert "Your Persona (you are this person):\nI like tea." in persobench_prompt(own)


# --- what the judges see ---------------------------------------------------------------------


def test_c_pair_tags_the_role_and_keeps_the_turn_being_answered() -> None:
    context = [Turn(speaker="User1", text="old turn"), Turn(speaker="User1", text="What now?")]
    head, reply = c_pair("I love cats.I live in Paris.", "user", context, "See the Louvre.")
    assert head == ("persona of the person addressed: I love cats. I live in Paris. "
                    "| they said: What now?")  # fmt: skip
    assert reply == "See the Louvre."
    own, _ = c_pair(["I love cats."], "self", [], "Me too!")
    assert own == "persona of the speaker: I love cats."


def test_coherence_input_and_shape_features() -> None:
    from persona_align.metrics.coherence_judge import coherence_input, shape_features

    context = [Turn(speaker="A", text="one"), Turn(speaker="B", text="mine"),
               Turn(speaker="A", text="your question?")]  # fmt: skip
    found = coherence_input(context, "answer", ["I like tea.", "I am tall."])
    assert (found.question, found.own, found.history) == ("your question?", "mine", "one mine")
    assert found.persona == "I like tea. I am tall."
    loop = shape_features("go go go go go go", "where?")
    assert loop[0] == pytest.approx(3 / 4)  # 4 trigrams, one distinct
    assert loop[1] == pytest.approx(1 / 6) and loop[4] == 0.0  # distinct-1, no final stop
    fine = shape_features("I think you will like it.", "Will I like it?")
    assert fine[0] == 0.0 and fine[4] == 1.0
    assert fine[5] == pytest.approx(1 / 6) and fine[6] == pytest.approx(1 / 6)  # I / you
    assert fine[7] == pytest.approx(4 / 6)  # {i, will, like, it} of 6 distinct words


def test_c_value_calls_contradictions_only_above_the_threshold() -> None:
    assert c_value([0.2, 0.3, 0.5], {}) == -1  # argmax without a threshold
    assert c_value([0.2, 0.3, 0.5], {"contradiction_threshold": 0.6}) == 0  # next best
    assert c_value([0.1, 0.2, 0.7], {"contradiction_threshold": 0.6}) == -1
    assert c_value([0.6, 0.3, 0.1], {"contradiction_threshold": 0.6}) == 1


# --- agreement figures -----------------------------------------------------------------------


def test_agreement_figures_by_hand() -> None:
    gold = [1, 1, 0, 0, -1, 0]
    judge = [1, 0, 0, -1, -1, 0]
    found = agreement(gold, judge, [1, 0, -1])
    assert found.accuracy == pytest.approx(4 / 6)
    # p_o = 4/6; p_e = (2/6)(1/6) + (3/6)(3/6) + (1/6)(2/6) = 13/36
    assert found.kappa == pytest.approx((4 / 6 - 13 / 36) / (1 - 13 / 36))
    assert found.confusion == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert found.false_contradictions == pytest.approx(1 / 5)
    per = found.per_class()
    assert per["-1"] == {"precision": 0.5, "recall": 1.0, "gold": 1, "predicted": 2}
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0


# --- judge eval ------------------------------------------------------------------------------


@pytest.fixture
def contradiction_judge(tmp_path: Path, make_classifier) -> Path:
    """A judge that calls everything a contradiction."""
    return make_classifier(tmp_path / "judge", C_IDS, winner=2, judge={"task": "c"})


def test_judge_eval_reports_agreement(tmp_path: Path, cli, contradiction_judge: Path) -> None:
    data = write_items(tmp_path / "dev.jsonl", [row("a", 1), row("b", 0), row("c", -1),
                                                row("d", 0, role="self")])  # fmt: skip
    result = cli("judge", "eval", "--data", data, "--model", contradiction_judge, "--json")
    assert result.code == 0, result.err
    summary = result.summary
    assert summary["accuracy"] == 0.25 and summary["items"] == 4
    assert summary["false_contradictions"] == 1.0
    assert summary["confusion"]["gold_by_predicted"] == [[0, 0, 1], [0, 0, 2], [0, 0, 1]]
    assert summary["per_class"]["-1"]["recall"] == 1.0
    assert set(summary["by_role"]) == {"user", "self"}
    assert summary["by_role"]["self"]["items"] == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row("a", 2)], "line 1: field 'label'"),
        ([row("a", 1), {"persona": "x", "context": "", "label": 1}], "line 2: field 'reply'"),
        ([row("a", 1, role="bot")], "field 'persona_role'"),
    ],
)
def test_judge_eval_bad_files_exit_2(tmp_path: Path, cli, rows, message, contradiction_judge):
    data = write_items(tmp_path / "dev.jsonl", rows)
    result = cli("judge", "eval", "--data", data, "--model", contradiction_judge)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1


def loop_hating_head(folder: Path) -> Path:
    """A coherence judge whose heads only read the repeated-trigram share: a loop scores ~0."""
    import numpy as np

    from persona_align.metrics.coherence_judge import COSINES, EMBED_DIM, HEADS

    weights = {}
    for name, columns in HEADS.items():
        w1 = np.zeros((len(columns), 1), dtype=np.float32)
        w1[columns.index(EMBED_DIM + COSINES), 0] = -10.0
        head = {"mean": np.zeros(len(columns), np.float32), "scale": np.ones(len(columns), np.float32),
                "w1": w1, "b1": np.array([5.0], np.float32), "w2": np.ones((1, 1), np.float32),
                "b2": np.array([-2.5], np.float32)}  # fmt: skip
        weights |= {f"{name}/{key}": value for key, value in head.items()}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "head.npz", **weights)
    (folder / "judge.json").write_text(json.dumps({"task": "coh", "encoder": "embedded-minilm"}))
    return folder


def test_judge_eval_refuses_a_judge_of_another_task(tmp_path: Path, cli, contradiction_judge):
    coh = loop_hating_head(tmp_path / "coh")
    data = write_items(tmp_path / "dev.jsonl", [row("a", 1)])
    result = cli("judge", "eval", "--data", data, "--model", coh)
    assert result.code == 2 and "is not a c judge" in result.err
    loops = write_items(tmp_path / "coh.jsonl", [row("The Louvre is the place to see.", 1),
                                                 row("see see see see see see see", 0)])  # fmt: skip
    ran = cli("judge", "eval", "--data", loops, "--model", coh, "--task", "coh", "--json")
    assert ran.code == 0 and ran.summary["accuracy"] == 1.0
    wrong = cli("judge", "eval", "--data", loops, "--model", contradiction_judge, "--task", "coh")
    assert wrong.code == 2 and "is not a coh judge" in wrong.err


# --- the LLM judge ---------------------------------------------------------------------------


def test_parse_label() -> None:
    assert parse_label('{"label": -1}') == -1
    assert parse_label('```json\n{"label": 1}\n```') == 1
    assert parse_label("The label is 0.") == 0
    assert parse_label("I cannot tell") is None


def test_llm_judge_labels_through_the_fake_server(tmp_path: Path, cli, monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")

    def answer(text: str) -> str:  # the "model" reads the reply's marker
        return json.dumps({"label": int(text.rsplit("LABEL", 1)[1].split()[0])})

    rows = [row("nice LABEL 1", 1), row("meh LABEL 0", 0), row("no LABEL -1", 0),
            row("own LABEL 1", 1, role="self")]  # fmt: skip
    data = write_items(tmp_path / "dev.jsonl", rows)
    with FakeOpenAIServer(answer=answer, expected_key="sk-test-secret",
                          faults={"500": 0.5}, faulty_attempts=1) as server:  # fmt: skip
        spec = f"openai:judge-model@{server.base_url}"
        result = cli("judge", "eval", "--data", data, "--judge", spec, "--api-key-env",
                     "JUDGE_KEY", "--json")  # fmt: skip
        assert result.code == 0, result.err
        assert result.summary["accuracy"] == 0.75 and result.summary["unjudged"] == 0
        assert result.summary["false_contradictions"] == pytest.approx(1 / 4)
        # the same labels through the metric, with the persona role in the instructions
        metric = make_metric("c", judge=spec, api_key_env="JUDGE_KEY")
        metric.load()
        items = [_score_item(r["reply"], r["persona_role"]) for r in rows]
        assert metric.score(items) == [1.0, 0.0, -1.0, 1.0]
    assert "sk-test-secret" not in result.out + result.err
    assert "speaker's own" not in json.dumps(metric.settings()["user"])


def test_llm_judge_failures_are_not_scores(tmp_path: Path) -> None:
    with FakeOpenAIServer(faults={"500": 1.0}) as server:
        judge = LLMJudge.from_spec(f"openai:m@{server.base_url}", "c", max_retries=1)
        import os

        os.environ.setdefault("OPENAI_API_KEY", "sk-x")
        labels = judge.labels([(["I like tea."], "user", "User1: Hi", "Tea!")])
    assert labels == [None] and judge.failed == 1


def test_llm_judge_bad_specs() -> None:
    with pytest.raises(InputError, match="openai:MODEL@BASE_URL"):
        make_metric("c", judge="claude")
    with pytest.raises(InputError, match="no option 'colour'"):
        make_metric("c", judge="openai:m@http://127.0.0.1:1/v1", colour=1)


def _score_item(reply: str, role: str = "user") -> ScoreItem:
    dialogue = Dialogue(id="d", persona=["I love cats.", "I live in Paris."], persona_role=role,
                        context=[Turn(speaker="User1", text="What should I see?")],
                        reference="The Louvre.")  # fmt: skip
    candidate = Candidate(dialogue_id="d", responder="r", raw=reply, response=reply, valid=True)
    return ScoreItem(dialogue, candidate)


# --- the metrics on judges -------------------------------------------------------------------


def test_c_uses_the_judge_and_its_role_aware_input(tmp_path: Path, make_classifier) -> None:
    folder = make_classifier(tmp_path / "j", C_IDS, winner=0, judge={"task": "c"})
    metric = make_metric("c", model=str(folder))
    metric.load()
    seen: list = []
    probabilities = metric.gate.model.probabilities

    def spy(pairs, on_batch=None):
        seen.extend(pairs)
        return probabilities(pairs, on_batch)

    metric.gate.model.probabilities = spy
    assert metric.score([_score_item("Cats!", "self"), _score_item("Cats!")]) == [1.0, 1.0]
    assert seen[0][0].startswith("persona of the speaker: I love cats. I live in Paris.")
    assert seen[1][0].startswith("persona of the person addressed:")
    assert metric.settings()["version"] and metric.settings()["spec"] == {"task": "c"}
    with pytest.raises(InputError, match="mode applies to NLI models"):
        make_metric("c", model=str(folder), mode="max").load()


def test_ue_gate_follows_the_c_judge(tmp_path: Path, make_classifier) -> None:
    uses = make_classifier(tmp_path / "uses", C_IDS, winner=0, judge={"task": "c"})
    neutral = make_classifier(tmp_path / "neutral", C_IDS, winner=1, judge={"task": "c"})
    entails = make_classifier(tmp_path / "nli", C_IDS, winner=0)
    item = _score_item("Cats!")
    ue = make_metric("ue", model=str(entails), persona_model=str(uses))
    ue.load()
    assert ue.score([item]) == [2.0]
    gated = make_metric("ue", model=str(entails), persona_model=str(neutral))
    gated.load()
    assert gated.score([item]) == [0.0]


def test_score_cache_keys_follow_the_judge_weights(tmp_path: Path, make_classifier) -> None:
    folder = make_classifier(tmp_path / "j", C_IDS, winner=0, judge={"task": "c"})
    first = make_metric("c", model=str(folder), batch_size=7)
    first.load()
    make_classifier(folder, C_IDS, winner=2, judge={"task": "c"})  # retrained in place
    second = make_metric("c", model=str(folder), batch_size=9)
    second.load()
    assert first.settings()["version"] != second.settings()["version"]


def test_coh_scores_through_the_judge_head(tmp_path: Path, make_classifier) -> None:
    from persona_align.metrics.base import Unavailable

    metric = make_metric("coh", model=str(loop_hating_head(tmp_path / "coh")))
    metric.load()
    fine, loop = metric.score([_score_item("The Louvre is the place to see."),
                               _score_item("see see see see see see see")])  # fmt: skip
    assert fine == pytest.approx(1 / (1 + math.exp(-2.5)), abs=1e-4)
    assert loop == pytest.approx(1 / (1 + math.exp(2.5)), abs=1e-4)  # relu(5 - 10 * 0.8) = 0
    assert metric.settings()["version"] and metric.settings()["spec"]["task"] == "coh"
    c_judge = make_classifier(tmp_path / "c", C_IDS, judge={"task": "c"})
    with pytest.raises(Unavailable, match="not a coherence judge"):
        make_metric("coh", model=str(c_judge)).load()


def test_judge_item_accepts_extra_fields() -> None:
    item = JudgeItem(**row("x", 1, note="why", system="gpt"))
    assert item.label == 1 and item.persona_role == "user"


# --- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-encoder")
    config = BertConfig(vocab_size=len(minilm_tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def test_coherence_examples_pair_real_turns_with_negatives() -> None:
    from persona_align.training.judge import NEGATIVE_KINDS, coherence_examples

    dialogues = read_dialogues(
        "jsonl", Path(__file__).parents[1] / "src/persona_align/sample_data/train.jsonl"
    )
    examples = coherence_examples(dialogues, positions=2, seed=0)
    kinds = {kind for _, _, kind in examples}
    assert kinds == {"real", *NEGATIVE_KINDS}
    assert all(label == (kind == "real") for _, label, kind in examples)
    # each negative follows its positive with the same history and a different reply
    for (pos, label, _), (neg, neg_label, _) in itertools.pairwise(examples):
        if label == 1 and neg_label == 0:
            assert (pos.question, pos.history) == (neg.question, neg.history)
            assert pos.reply != neg.reply
    assert coherence_examples(dialogues, seed=0) == examples  # seeded


def test_train_judge_writes_a_loadable_judge(tmp_path: Path, tiny_encoder: Path, cli) -> None:
    from persona_align.metrics.nli import PairClassifier
    from persona_align.training.cross_encoder import FitSettings
    from persona_align.training.judge import train_judge

    rows = [row(f"reply {i}", (-1, 0, 1)[i % 3], role=("user", "self")[i % 2]) for i in range(12)]
    data = write_items(tmp_path / "train.jsonl", rows)
    settings = FitSettings(base=str(tiny_encoder), max_steps=2, batch_size=4, max_length=64)
    result = train_judge("c", tmp_path / "judge", train=[data], dev=[data], settings=settings)
    assert result.steps == 2 and result.labels == {"entailment": 4, "neutral": 4,
                                                   "contradiction": 4}  # fmt: skip
    judge = PairClassifier(str(tmp_path / "judge"))
    judge.load()
    assert judge.spec["task"] == "c" and judge.labels == ("entailment", "neutral", "contradiction")
    saved = json.loads((tmp_path / "judge" / "training.json").read_text())
    assert saved["dev"]["train.jsonl"]["items"] == 12
    ran = cli("judge", "eval", "--data", data, "--model", tmp_path / "judge", "--json")
    assert ran.code == 0 and ran.summary["accuracy"] == saved["dev"]["train.jsonl"]["accuracy"]
    with pytest.raises(InputError, match="no training examples"):
        train_judge("coh", tmp_path / "empty", settings=settings)


def test_a_judge_over_fewer_layers_loads_with_those_layers(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    """``layers`` keeps the encoder's first N layers; the judge folder's config says so, and it
    loads with N layers over the full base, continuing from a judge trained over all of them."""
    from persona_align.metrics.nli import PairClassifier
    from persona_align.training.cross_encoder import FitSettings
    from persona_align.training.judge import train_judge

    rows = [row(f"reply {i}", (-1, 0, 1)[i % 3]) for i in range(6)]
    data = write_items(tmp_path / "train.jsonl", rows)
    common = {"base": str(tiny_encoder), "max_steps": 1, "batch_size": 4, "max_length": 64}
    train_judge("c", tmp_path / "full", train=[data], settings=FitSettings(**common))
    student = FitSettings(**common, layers=1, init=str(tmp_path / "full"))
    train_judge("c", tmp_path / "short", train=[data], settings=student)
    judge = PairClassifier(str(tmp_path / "short"))
    judge.load()
    assert len(judge.model.bert.encoder.layer) == 1
    saved = json.loads((tmp_path / "short" / "training.json").read_text())
    assert saved["settings"]["layers"] == 1
    with pytest.raises(InputError, match="has 2, got 3"):
        train_judge("c", tmp_path / "long", train=[data], settings=FitSettings(**common, layers=3))


def test_train_coherence_judge_writes_a_loadable_judge(tmp_path: Path, cli) -> None:
    from persona_align.metrics.coherence_judge import HEADS
    from persona_align.training.cross_encoder import FitSettings
    from persona_align.training.judge import COH_SEEDS, train_judge

    sample = Path(__file__).parents[1] / "src/persona_align/sample_data/train.jsonl"
    dialogues = read_dialogues("jsonl", sample)[:12]
    dev = write_items(tmp_path / "dev.jsonl", [row("The Louvre.", 1), row("a a a a a a a", 0)])
    result = train_judge("coh", tmp_path / "coh", dialogues=dialogues, dev=[dev],
                         settings=FitSettings(epochs=2))  # fmt: skip
    assert result.labels["coherent"] >= 12 and result.labels["incoherent"] >= 1
    assert result.dev["dev.jsonl"]["items"] == 2
    import numpy as np

    with np.load(tmp_path / "coh" / "head.npz") as weights:
        assert {key.split("/")[0] for key in weights.files} == set(HEADS)
        members = {key.rpartition("/")[0] for key in weights.files}
        assert len(members) == len(HEADS) * COH_SEEDS
        # the seed members differ: an ensemble, not one head saved five times
        assert len({weights[f"{m}/w1"].tobytes() for m in members}) == len(members)
    ran = cli(
        "judge", "eval", "--data", dev, "--task", "coh", "--model", tmp_path / "coh", "--json"
    )
    assert ran.code == 0 and ran.summary["accuracy"] == result.dev["dev.jsonl"]["accuracy"]


def test_labelled_weight_lets_few_read_labels_outweigh_many_pseudo_labels(tmp_path: Path) -> None:
    import numpy as np

    from persona_align.training.judge import fit_coherence_head, train_judge

    rng = np.random.default_rng(0)
    # the same feature region: 200 pseudo-labelled "coherent" rows, 20 read "incoherent" ones
    matrix = np.concatenate([rng.normal(1, 0.1, (220, 2)), rng.normal(-1, 0.1, (200, 2))])
    labels = np.array([1] * 200 + [0] * 20 + [0] * 200)
    read = np.array([False] * 200 + [True] * 20 + [False] * 200)
    found = {}
    for weight in (1.0, 40.0):
        head, _ = fit_coherence_head(matrix, labels, epochs=40, lr=1e-2, seed=0, balance=False,
                                     sample_weight=np.where(read, weight, 1.0))  # fmt: skip
        hidden = np.maximum(0, (np.array([1.0, 1.0]) - head["mean"]) / head["scale"] @ head["w1"]
                            + head["b1"])  # fmt: skip
        found[weight] = float(1 / (1 + np.exp(-(hidden @ head["w2"] + head["b2"])[0])))
    assert found[1.0] > 0.5 > found[40.0]
    with pytest.raises(InputError, match="labelled_weight must be positive"):
        train_judge("coh", tmp_path / "judge", labelled_weight=0)


def test_train_judge_command_continues_only_from_adapter_folders(tmp_path: Path, cli) -> None:
    data = write_items(tmp_path / "train.jsonl", [row("reply", 1)])
    ran = cli("train", "judge", "c", "-o", tmp_path / "judge", "--train", data,
              "--init", tmp_path)  # fmt: skip
    assert ran.code == 2 and "no adapter_config.json" in ran.err
    assert not (tmp_path / "judge").exists()


# --- distillation ----------------------------------------------------------------------------


def test_targets_replace_labels_in_training(tmp_path: Path, tiny_encoder: Path) -> None:
    """Trained towards target distributions that contradict the labels, the model follows the
    targets: the loss reads them, not the labels."""
    from persona_align.metrics.nli import PairClassifier
    from persona_align.training.cross_encoder import FitSettings, fit_pair_classifier, save_adapter

    pairs = [("I love cats.", f"reply {i}") for i in range(8)]
    settings = FitSettings(base=str(tiny_encoder), epochs=20, batch_size=8, lr=5e-2,
                           max_length=32)  # fmt: skip
    model, _, config, _, _ = fit_pair_classifier(
        pairs, [0] * 8, C_LABELS, settings, targets=[[0.0, 0.0, 1.0]] * 8
    )
    save_adapter(tmp_path / "judge", model, config)
    judge = PairClassifier(str(tmp_path / "judge"))
    assert (judge.probabilities(pairs)[:, 2] > 0.6).all()


def test_a_distilled_judge_learns_the_teachers_distribution(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    from persona_align.metrics.nli import PairClassifier
    from persona_align.training import judge as training
    from persona_align.training.cross_encoder import FitSettings

    rows = [row(f"reply {i}", (-1, 0, 1)[i % 3]) for i in range(6)]
    data = write_items(tmp_path / "train.jsonl", rows)
    extra = write_items(tmp_path / "extra.jsonl", [
        {k: v for k, v in row(f"unread {i}", 0).items() if k != "label"} for i in range(4)
    ])  # fmt: skip
    common = {"base": str(tiny_encoder), "max_steps": 1, "batch_size": 4, "max_length": 64}
    training.train_judge("c", tmp_path / "teacher", train=[data], settings=FitSettings(**common))
    teacher = PairClassifier(str(tmp_path / "teacher"))
    items = read_judge_items(data)
    pairs = [c_item_pair(i) for i in items]
    extra_pairs = [c_item_pair(i) for i in read_jsonl(extra, JudgeInput)]
    seen = teacher.probabilities(pairs + extra_pairs)
    labels = [c_label_index(i.label) for i in items]
    targets = training._teacher_targets(str(tmp_path / "teacher"), pairs + extra_pairs,
                                        labels, None)  # fmt: skip
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(targets[:6], 0.5 * seen[:6] + 0.5 * onehot, atol=1e-6)
    np.testing.assert_allclose(targets[6:], seen[6:], atol=1e-6)
    result = training.train_judge(
        "c", tmp_path / "student", train=[data], teacher=str(tmp_path / "teacher"),
        unlabelled=[extra], settings=FitSettings(**common, layers=1),
    )  # fmt: skip
    assert result.sources["unlabelled (teacher)"] == 4
    assert result.settings["teacher"] == str(tmp_path / "teacher")
    with pytest.raises(InputError, match="only used with a teacher"):
        training.train_judge("c", tmp_path / "x", train=[data], unlabelled=[extra])
    with pytest.raises(InputError, match="for the c judge only"):
        training.train_judge("coh", tmp_path / "x", teacher=str(tmp_path / "teacher"))
