"""NLI readers, the NLIModel wrapper, the C and UE metrics, and NLI training (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_align.data.nli import NLIPair, guess_format, normalise_label, read_nli
from persona_align.errors import InputError
from persona_align.metrics.base import ScoreItem, Unavailable, make_metric
from persona_align.metrics.consistency import CScore, UEScore
from persona_align.metrics.nli import EMBEDDED_NLI, NLIModel, embedded_nli_dir, label_order
from persona_align.records import Candidate, Dialogue, Turn

# --- readers -------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_dnli_reader_maps_positive_and_negative(tmp_path: Path) -> None:
    f = write(
        tmp_path / "nli.txt",
        "i have a dog .</s>i own a dog .</s>positive\n\n"
        "i like tea .</s>i am tall .</s>neutral\n"
        "i am 22 .</s>i am 50 years old .</s>negative\n",
    )
    assert guess_format(f) == "dnli"
    assert read_nli(f) == [
        NLIPair("i have a dog .", "i own a dog .", "entailment"),
        NLIPair("i like tea .", "i am tall .", "neutral"),
        NLIPair("i am 22 .", "i am 50 years old .", "contradiction"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a .</s>b .\n", "line 2: expected 3 fields separated by '</s>', found 2"),
        ("a .</s>b .</s>entailment\n", "line 2: field 'label': unknown label 'entailment'"),
        ("a .</s>  </s>neutral\n", "line 2: field 'sentence2': is empty"),
    ],
)
def test_dnli_reader_bad_input(tmp_path: Path, line: str, message: str) -> None:
    f = write(tmp_path / "nli.txt", "x .</s>y .</s>neutral\n" + line)
    with pytest.raises(InputError) as err:
        read_nli(f, "dnli")
    assert str(err.value).startswith(f"{f}:{message}")


def mnli_folder(root: Path, labels: str = "entailment\nneutral\ncontradiction\n") -> Path:
    write(root / "s1.test", "A man sleeps .\nA cat runs .\nIt rains .\n")
    write(root / "s2.test", "A person sleeps .\nThe cat is black .\nIt is dry .\n")
    write(root / "labels.test", labels)
    return root


def test_mnli_hard_reader_takes_the_folder_or_a_file(tmp_path: Path) -> None:
    folder = mnli_folder(tmp_path / "mnli")
    expected = [
        NLIPair("A man sleeps .", "A person sleeps .", "entailment"),
        NLIPair("A cat runs .", "The cat is black .", "neutral"),
        NLIPair("It rains .", "It is dry .", "contradiction"),
    ]
    assert read_nli(folder) == expected
    assert read_nli(folder / "s2.test", "mnli-hard") == expected


def test_mnli_hard_reader_bad_input(tmp_path: Path) -> None:
    folder = mnli_folder(tmp_path / "a", labels="entailment\nneutral\n")
    with pytest.raises(InputError, match=r"must have as many lines: s1\.test 3, s2\.test 3"):
        read_nli(folder, "mnli-hard")
    folder = mnli_folder(tmp_path / "b", labels="entailment\nNEUTRAL\ncontradiction\n")
    with pytest.raises(InputError) as err:
        read_nli(folder, "mnli-hard")
    assert str(err.value).startswith(f"{folder / 'labels.test'}:line 2: field 'label'")
    (folder / "s1.test").unlink()
    with pytest.raises(InputError, match=r"no s1\.test here"):
        read_nli(folder, "mnli-hard")


def snli_line(**fields: object) -> str:
    base = {"sentence1": "A dog runs.", "sentence2": "An animal moves.", "gold_label": "entailment"}
    return json.dumps(base | fields) + "\n"


def test_snli_reader_skips_pairs_without_a_gold_label(tmp_path: Path) -> None:
    f = write(tmp_path / "snli.jsonl", snli_line() + snli_line(gold_label="-"))
    assert read_nli(f) == [NLIPair("A dog runs.", "An animal moves.", "entailment")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json\n", "line 2: malformed JSON"),
        ("[1, 2]\n", "line 2: expected a JSON object, got list"),
        (
            json.dumps({"sentence1": "a", "gold_label": "neutral"}) + "\n",
            "line 2: field 'sentence2': is missing",
        ),
        (snli_line(gold_label="yes"), "line 2: field 'gold_label': unknown label 'yes'"),
        (snli_line(sentence1=3), "line 2: field 'sentence1': expected text, got int"),
    ],
)
def test_snli_reader_bad_input(tmp_path: Path, line: str, message: str) -> None:
    f = write(tmp_path / "snli.jsonl", snli_line() + line)
    with pytest.raises(InputError) as err:
        read_nli(f, "snli-hard")
    assert str(err.value).startswith(f"{f}:{message}")


SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"


def test_sick_reader(tmp_path: Path) -> None:
    f = write(
        tmp_path / "SICK.txt",
        SICK_HEADER + "1\tA boy plays\tA kid plays\t4.5\tENTAILMENT\n"
        "2\tA boy plays\tNobody plays\t3.6\tCONTRADICTION\n",
    )
    assert guess_format(f) == "sick"
    assert read_nli(f) == [
        NLIPair("A boy plays", "A kid plays", "entailment"),
        NLIPair("A boy plays", "Nobody plays", "contradiction"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "pair_ID\tsentence_A\tsentence_B\n1\ta\tb\n",
            "line 1: header lacks column 'entailment_judgment'",
        ),
        (SICK_HEADER + "1\ta\tb\t4.5\n", "line 2: expected 5 tab-separated fields, found 4"),
        (
            SICK_HEADER + "1\ta\tb\t4.5\tentailment\n",
            "line 2: field 'entailment_judgment': unknown label",
        ),
    ],
)
def test_sick_reader_bad_input(tmp_path: Path, text: str, message: str) -> None:
    f = write(tmp_path / "SICK.txt", text)
    with pytest.raises(InputError) as err:
        read_nli(f, "sick")
    assert str(err.value).startswith(f"{f}:{message}")


def test_read_nli_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown NLI format 'xnli'"):
        read_nli(tmp_path, "xnli")
    with pytest.raises(InputError, match="does not exist"):
        read_nli(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="cannot tell the NLI format"):
        read_nli(write(tmp_path / "x.txt", "hello\n"))
    with pytest.raises(InputError, match="no dnli pairs found"):
        read_nli(write(tmp_path / "empty.txt", "\n"), "dnli")


# --- label order ---------------------------------------------------------------------------


def test_label_names_are_normalised() -> None:
    assert [normalise_label(n) for n in ("ENTAILMENT", "entail", "positive", " Neutral ")] == [
        "entailment", "entailment", "entailment", "neutral",
    ]  # fmt: skip
    assert [normalise_label(n) for n in ("CONTRADICTION", "contradict", "negative")] == [
        "contradiction"
    ] * 3
    assert normalise_label("LABEL_0") is None
    assert label_order({0: "contradiction", 1: "entailment", 2: "neutral"}) == [1, 2, 0]
    assert label_order({"0": "NEGATIVE", "1": "NEUTRAL", "2": "POSITIVE"}) == [2, 1, 0]
    with pytest.raises(Unavailable, match="labelled 'LABEL_0'"):
        label_order({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(Unavailable, match="no neutral output"):
        label_order({0: "entailment", 1: "contradiction"})
    with pytest.raises(Unavailable, match="names entailment twice"):
        label_order({0: "entailment", 1: "positive", 2: "neutral"})


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory: pytest.TempPathFactory, make_classifier) -> Path:
    folder = tmp_path_factory.mktemp("tiny-nli")
    return make_classifier(folder, {0: "entailment", 1: "neutral", 2: "contradiction"})


def test_label_order_comes_from_id2label(tmp_path: Path, make_classifier) -> None:
    pairs = [("i have a dog .", "i have a cat ."), ("a", "b")]
    upper = make_classifier(tmp_path / "a", {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}, 2)
    assert NLIModel(str(upper)).predict(pairs) == ["contradiction"] * 2
    other = {0: "contradiction", 1: "entailment", 2: "neutral"}
    shuffled = NLIModel(str(make_classifier(tmp_path / "b", other, 2)))
    assert shuffled.predict(pairs) == ["neutral"] * 2
    probabilities = shuffled.probabilities(pairs)
    assert probabilities.shape == (2, 3) and probabilities[0].argmax() == 1  # LABELS order
    first = NLIModel(str(make_classifier(tmp_path / "c", other, 0)))
    assert first.predict(pairs) == ["contradiction"] * 2
    generic = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(Unavailable, match="label order cannot be known"):
        NLIModel(str(make_classifier(tmp_path / "d", generic))).load()


def test_identical_pairs_run_once_in_length_sorted_batches(tiny_nli: Path) -> None:
    nli = NLIModel(str(tiny_nli), batch_size=4)
    nli.load()
    seen: list[int] = []
    forward = nli.model.forward

    def counting(**inputs):
        seen.append(inputs["input_ids"].shape[0])
        return forward(**inputs)

    nli.model.forward = counting
    persona = ["i have a dog .", "i live in a very big house near the sea .", "i teach ."]
    replies = ["my dog is called rex .", "i am a teacher at a school in the town ."]
    pairs = [(p, r) for _ in range(5) for r in replies for p in persona]
    batched = nli.probabilities(pairs)
    assert sorted(seen) == [2, 4]  # 6 unique pairs, not 30
    one_by_one = NLIModel(str(tiny_nli), batch_size=1)
    expected = one_by_one.probabilities(pairs[:6])
    assert batched[:6] == pytest.approx(expected, abs=1e-5)
    assert (batched[6:12] == batched[:6]).all()


def test_c_and_ue_share_one_model_and_its_results(tiny_nli: Path) -> None:
    c = make_metric("c", model=str(tiny_nli))
    ue = make_metric("ue", model=str(tiny_nli), persona_model=str(tiny_nli))  # PersoBench's UE
    nli = c.gate.model
    assert nli is ue.nli is ue.gate.model
    assert make_metric("c", model=str(tiny_nli), batch_size=3).gate.model is not nli
    items = [ScoreItem(*item("my dog is called rex .", reference="i have a dog .", i=i))
             for i in range(3)]  # fmt: skip
    nli.forwarded = 0
    nli._memo.clear()
    first = c.score(items)
    assert nli.forwarded == 1  # three identical (persona, reply) pairs: one forward
    ue.score(items)
    # only the (reference, reply) pair is new, and it is judged only if the persona entails
    assert nli.forwarded == 1 + (first[0] == 1.0)
    fresh = make_metric("c", model=str(tiny_nli), batch_size=3)  # its own model, no memo
    assert fresh.score(items) == first


def test_unresolvable_models_are_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Unavailable, match="cannot load NLI model 'nobody-xyz/no-such-nli'"):
        NLIModel("nobody-xyz/no-such-nli").load()
    with pytest.raises(Unavailable, match="neither a directory nor a hub id"):
        NLIModel(str(tmp_path / "missing" / "model.bin")).load()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Unavailable, match="cannot load NLI model"):
        NLIModel(str(empty)).load()


def test_metric_options_are_checked() -> None:
    assert isinstance(make_metric("c", mode="max", model="x", dtype="bfloat16"), CScore)
    for options, message in [
        ({"mode": "median"}, "mode must be one of persobench, max, mean"),
        ({"dtype": "int8"}, "dtype must be one of auto, float32, bfloat16"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"model": ""}, "model must be a name"),
        ({"temperature": 1}, "temperature"),
    ]:
        with pytest.raises(InputError, match=message):
            make_metric("c", **options)
    assert make_metric("ue").model == f"embedded-c-judge + {EMBEDDED_NLI}"
    assert make_metric("c", model=EMBEDDED_NLI, mode="mean").settings() == {
        "name": "c", "model": EMBEDDED_NLI, "version": None, "dtype": "float32", "mode": "mean",
        "spec": {},
    }  # fmt: skip


# --- C and UE ------------------------------------------------------------------------------

PERSONA = ["I have a dog.", "I live in Paris.", "I am a teacher."]


def item(response: str | None, reference: str | None = "My dog is called Rex.", i: int = 0):
    dialogue = Dialogue(
        id=f"d{i}", persona=PERSONA, context=[Turn(speaker="User1", text="Hi!")],
        reference=reference,
    )  # fmt: skip
    candidate = Candidate(
        dialogue_id=f"d{i}", responder="r", raw=response or "oops", response=response,
        valid=response is not None,
    )  # fmt: skip
    return dialogue, candidate


def fake_nli(metric, labels: dict[tuple[str, str], str]) -> list[list[tuple[str, str]]]:
    """Replace the metric's NLI model(s) by one lookup table; returns the pair lists asked."""
    calls: list[list[tuple[str, str]]] = []
    fake = NLIModel(EMBEDDED_NLI)  # not the process-wide shared instance

    def predict(pairs, on_batch=None):
        calls.append(list(pairs))
        return [labels.get(pair, "neutral") for pair in pairs]

    fake.predict = predict
    fake.load = lambda: None
    metric.gate.model = fake
    if hasattr(metric, "nli"):  # UE's (gold reply, reply) model
        metric.nli = fake
    return calls


WHOLE = "I have a dog. I live in Paris. I am a teacher."
A, B = "My dog Rex loves Paris.", "I hate dogs and live in Rome."
NLI_TABLE = {
    (WHOLE, A): "entailment",
    ("I have a dog.", A): "entailment",
    ("I live in Paris.", A): "neutral",
    ("I am a teacher.", A): "contradiction",
    (WHOLE, B): "contradiction",
    ("I have a dog.", B): "contradiction",
    ("I live in Paris.", B): "contradiction",
    # ("I am a teacher.", B) → neutral (the fake's default)
}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("persobench", [1.0, -1.0]), ("max", [1.0, 0.0]), ("mean", [0.0, -2 / 3])],
)
def test_c_score_modes(mode: str, expected: list[float]) -> None:
    metric = make_metric("c", model=EMBEDDED_NLI, mode=mode)
    calls = fake_nli(metric, NLI_TABLE)
    items = [ScoreItem(*item(A)), ScoreItem(*item(B))]
    assert metric.score(items) == pytest.approx(expected)
    assert len(calls) == 1  # one batched call for all items
    premises = {p for p, _ in calls[0]}
    assert premises == ({WHOLE} if mode == "persobench" else set(PERSONA))


def test_ue_score_values() -> None:
    metric = make_metric("ue", persona_model=EMBEDDED_NLI)  # PersoBench's NLI persona gate
    ref = "My dog is called Rex."
    calls = fake_nli(
        metric,
        {(WHOLE, "both"): "entailment", (ref, "both"): "entailment",
         (WHOLE, "persona"): "entailment", (ref, "persona"): "neutral",
         (WHOLE, "reference"): "neutral", (ref, "reference"): "entailment",
         (WHOLE, "neither"): "contradiction"},
    )  # fmt: skip
    items = [ScoreItem(*item(r)) for r in ("both", "persona", "reference", "neither")]
    items.append(ScoreItem(*item("both", reference=None)))
    assert metric.score(items) == [2.0, 1.0, 0.0, 0.0, None]
    assert UEScore.needs_reference
    # the gold reply is asked about only the replies the persona entails
    assert calls[1:] == [[(ref, "both"), (ref, "persona")]]
    calls = fake_nli(metric, {})  # nothing entailed: no second call at all
    assert metric.score(items[:2]) == [0.0, 0.0]
    assert len(calls) == 1


def test_failures_get_the_worst_value() -> None:
    from persona_align.metrics.scorer import prepare_metrics, score_stream

    metrics = [make_metric("c", model=EMBEDDED_NLI, mode="max"),
               make_metric("ue", persona_model=EMBEDDED_NLI)]  # fmt: skip
    for metric in metrics:
        fake_nli(metric, NLI_TABLE)
    pairs = [item(A, i=0), item(None, i=1), item(B, reference=None, i=2)]
    dialogues = {d.id: d for d, _ in pairs}
    statuses = prepare_metrics(metrics, list(dialogues.values()))
    scored = list(score_stream(dialogues, [c for _, c in pairs], metrics, statuses))
    assert [s.scores for s in scored] == [
        {"c": 1.0, "ue": 1.0},  # A: entailed by the persona, not by the reference (neutral)
        {"c": -1.0, "ue": 0.0},  # failure
        {"c": 0.0, "ue": None},  # no reference: UE cannot be computed
    ]


def test_an_unavailable_model_is_reported_not_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from persona_align.metrics.scorer import prepare_metrics

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    metric = make_metric("c", model="nobody-xyz/no-such-nli")
    (status,) = prepare_metrics([metric], [item(A)[0]])
    assert not status.available and "no-such-nli" in (status.reason or "")


def test_embedded_nli_loads_the_shipped_adapter() -> None:
    folder = embedded_nli_dir()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert (folder / "adapter_config.json").is_file() and size < 5_000_000
    nli = NLIModel(EMBEDDED_NLI)
    assert nli.predict(
        [("i have two dogs .", "i have two dogs ."), ("i have two dogs .", "i hate dogs .")]
    ) == ["entailment", "contradiction"]


# --- training and commands -------------------------------------------------------------------


def nli_data_dir(root: Path) -> Path:
    """A miniature copy of the shared NLI layout (~50 pairs), SICK included to be ignored."""
    lines = []
    for i in range(20):
        lines.append(f"i have {i} dogs .</s>i own {i} dogs .</s>positive")
        lines.append(f"i have {i} cats .</s>i have no cats .</s>negative")
    write(root / "dnli" / "nli-train.txt", "\n".join(lines) + "\n")
    write(
        root / "dnli" / "nli-valid.txt",
        "i have 3 dogs .</s>i own 3 dogs .</s>positive\n"  # also in training: dropped
        "i like tea .</s>i am tall .</s>neutral\n"
        "i like tea .</s>i am tall .</s>neutral\n"  # duplicate: kept once
        "i am a nurse .</s>i work at a hospital .</s>positive\n",
    )
    mnli_folder(root / "mnli" / "MNLIMatchedHardWithHardTest")
    write(root / "snli" / "snli_1.0_test_hard.jsonl", snli_line() * 2 + snli_line(gold_label="-"))
    write(root / "sick" / "SICK.txt", SICK_HEADER + "1\ta\tb\t1\tBROKEN\n")  # never read
    return root


def test_training_data_layout(tmp_path: Path) -> None:
    from persona_align.training.nli import load_training_data

    data = load_training_data(nli_data_dir(tmp_path))
    assert data.sources == {"dnli-train": 40, "mnli-hard:MNLIMatchedHardWithHardTest": 3,
                            "snli-hard": 2}  # fmt: skip
    assert len(data.train) == 44  # the two identical SNLI lines count once
    assert [(p.premise, p.label) for p in data.valid] == [
        ("i like tea .", "neutral"), ("i am a nurse .", "entailment"),
    ]  # fmt: skip
    (tmp_path / "snli" / "snli_1.0_test_hard.jsonl").unlink()
    with pytest.raises(InputError, match="no SNLI-hard file"):
        load_training_data(tmp_path)


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_train_one_step_writes_an_adapter_that_reloads(tmp_path: Path, tiny_nli: Path) -> None:
    import torch

    from persona_align.training.nli import train_nli

    data = nli_data_dir(tmp_path / "data")
    runs = []
    for name in ("a", "b"):
        result = train_nli(
            tmp_path / name, data_dir=data, base=str(tiny_nli), max_steps=1, batch_size=8,
            lora_r=4, seed=3,
        )  # fmt: skip
        runs.append(adapter_weights(tmp_path / name))
    assert result.steps == 1 and result.train_pairs == 44 and result.valid_pairs == 2
    assert result.valid is not None and result.valid["pairs"] == 2
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same seed, same weights
    names = " ".join(runs[0])
    assert "lora_A" in names and "classifier" in names and "pooler" in names
    folder = tmp_path / "a"
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "config.json", "training.json",
    }  # fmt: skip
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_nli)
    reloaded = NLIModel(str(folder))
    assert len(reloaded.predict([("i have 3 dogs .", "i own 3 dogs .")])) == 1
    assert reloaded.model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}


def test_nli_commands(tmp_path: Path, tiny_nli: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from persona_align.cli.nli import nli_app, train_nli_command

    runner = CliRunner()
    data = nli_data_dir(tmp_path / "data")
    result = runner.invoke(
        nli_app, ["eval", "--data", str(data / "dnli" / "nli-valid.txt"), "--model",
                  str(tiny_nli), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["pairs"] == 4 and summary["command"] == "nli eval"
    assert sum(map(sum, summary["confusion"]["gold_by_predicted"])) == 4
    result = runner.invoke(nli_app, ["eval", "--data", str(data / "dnli"), "--format", "dnli"])
    assert isinstance(result.exception, InputError) and "is a directory" in str(result.exception)
    result = runner.invoke(nli_app, ["eval", "--data", str(data / "dnli" / "nli-valid.txt"),
                                     "--model", str(tmp_path / "nothing.bin")])  # fmt: skip
    assert isinstance(result.exception, InputError) and "unavailable" in str(result.exception)

    train = typer.Typer()
    train.command("nli")(train_nli_command)
    train.command("other")(lambda: None)  # a group, as `persona-align train nli` will be
    result = runner.invoke(
        train, ["nli", "-o", str(tmp_path / "out"), "--data-dir", str(data), "--base",
                str(tiny_nli), "--epochs", "1", "--batch-size", "64", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["valid"]["pairs"] == 2
    result = runner.invoke(train, ["nli", "-o", str(tmp_path / "x"), "--data-dir", str(data),
                                   "--lr", "0"])  # fmt: skip
    assert isinstance(result.exception, InputError) and "lr must be" in str(result.exception)
    result = runner.invoke(train, ["nli", "-o", str(data), "--data-dir", str(data)])
    assert isinstance(result.exception, InputError) and "refusing" in str(result.exception)
