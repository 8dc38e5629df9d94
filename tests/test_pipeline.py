"""`persona-align run`: every stage end to end, skipped when unchanged, bad configs refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from persona_align.errors import InputError

STAGES = ["data", "generate", "score", "pairs", "train", "evaluate", "report"]


def tiny_config(model: Path, **changes: object) -> dict:
    config = {
        "name": "tiny",
        "output_dir": "run",
        "data": {"train": "sample:train", "eval": "sample:valid", "limit": 4, "eval_limit": 3},
        "generate": {
            "responders": [
                {"kind": "hf", "model": str(model), "name": "tiny"},
                {"kind": "reference", "name": "gold", "format": "json"},
                {"kind": "reference", "name": "gold-plain", "format": "text"},
                {
                    "kind": "import",
                    "name": "small-talk",
                    "path": "sample:responses-small-talk",
                    "subset": True,
                },
            ],
            "params": {"max_new_tokens": 12},
            "use_cache": False,
        },
        "score": {"metrics": ["lfc", "dist-1"], "use_cache": False},
        "pairs": {"rule": "quantile", "weights": {"lfc": 1.0}},
        "train": {
            "model": str(model),
            "max_steps": 2,
            "batch_size": 2,
            "save_steps": 1,
            "lora": {"r": 4, "alpha": 8},
        },
        "evaluate": {"params": {"max_new_tokens": 12}},
        "report": {"baseline": "base", "n_boot": 100},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    return config


def write(folder: Path, config: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage_status(result) -> dict[str, bool]:
    return {name: entry["skipped"] for name, entry in result.summary["stages"].items()}


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_run_end_to_end_then_skip_then_from(cli, isolated: Path, tiny_llama_dir: Path) -> None:
    config = write(isolated, tiny_config(tiny_llama_dir))
    first = cli("run", str(config), "--json")
    assert first.code == 0, first.err
    assert stage_status(first) == dict.fromkeys(STAGES, False)
    run = isolated / "run"
    for name in STAGES:
        manifest = json.loads((run / name / "manifest.json").read_text())
        assert manifest["stage"] == name and len(manifest["key"]) == 64
        assert {"torch", "transformers", "trl", "python"} <= set(manifest["versions"])
        assert "git_revision" in manifest and manifest["seconds"] >= 0
        assert all(Path(p).exists() for p in manifest["outputs"].values())
    data = json.loads((run / "data" / "manifest.json").read_text())
    assert set(data["inputs"]) == {"train", "eval"}  # the sample files, hashed
    stages = first.summary["stages"]
    assert stages["generate"]["responders"]["gold"] == {"candidates": 4, "valid": 4}
    assert stages["generate"]["responders"]["gold-plain"]["valid"] == 0
    assert stages["generate"]["responders"]["small-talk"] == {"candidates": 4, "valid": 4}
    assert stages["pairs"]["records"] > 0
    assert stages["train"]["steps"] == 2
    assert set(stages["report"]["systems"]) == {"base", "trained"}
    html = (run / "report" / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64" in html
    assert "training" in (run / "report" / "report.md").read_text().lower()

    again = cli("run", str(config), "--json")
    assert again.code == 0 and stage_status(again) == dict.fromkeys(STAGES, True)

    forced = cli("run", str(config), "--from", "pairs", "--json")
    assert forced.code == 0
    assert stage_status(forced) == {n: n in ("data", "generate", "score") for n in STAGES}

    changed = write(isolated, tiny_config(tiny_llama_dir, **{"train.max_steps": 1}))
    rerun = cli("run", str(changed), "--json")
    assert rerun.code == 0
    assert stage_status(rerun) == {n: n not in ("train", "evaluate", "report") for n in STAGES}
    assert rerun.summary["stages"]["train"]["steps"] == 1


def test_a_crash_keeps_completed_stages(
    cli, isolated: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import persona_align.training.dpo as dpo

    config = write(isolated, tiny_config(tiny_llama_dir, evaluate=None, report=None))

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(dpo, "train_dpo", crash)
    with pytest.raises(RuntimeError, match="killed"):
        cli("run", str(config))
    run = isolated / "run"
    assert all((run / n / "manifest.json").exists() for n in ("data", "generate", "score", "pairs"))
    assert not (run / "train" / "manifest.json").exists()
    monkeypatch.undo()
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(isolated / "cache"))
    result = cli("run", str(config), "--json")
    assert result.code == 0, result.err
    assert stage_status(result) == {"data": True, "generate": True, "score": True,
                                    "pairs": True, "train": False}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train.optimiser": "adam"}, "train.optimiser"),
        ({"train.max_steps": "many"}, "train.max_steps"),
        ({"pairs": None}, "train"),
        ({"score": None}, "pairs"),
        ({"data.train": "missing.jsonl"}, "missing.jsonl"),
        ({"pairs.weights": {"coh": 1.0}}, "pairs.weights"),
        ({"train": None}, "evaluate.trained"),
        ({"generate.responders": [{"kind": "nope"}]}, "nope"),
        ({"stage9": {}}, "stage9"),
        ({"score.metrics": ["lfc", "bogus"]}, "score.metrics"),
        ({"data.format": "nope"}, "field 'data.format': unknown format 'nope'"),
        ({"data.train": "."}, "field 'data.train': is a directory"),
        (
            {"generate.responders": [{"kind": "openai", "model": "m", "timeout": "soon"}]},
            "field 'generate.responders.0.timeout'",
        ),
    ],
)
def test_bad_configs_fail_before_any_work(
    cli, isolated: Path, tiny_llama_dir: Path, change: dict, expected: str
) -> None:
    config = tiny_config(tiny_llama_dir)
    for key, value in change.items():
        section, _, field = key.partition(".")
        if field:
            config[section][field] = value
        elif value is None:
            del config[section]
        else:
            config[section] = value
    result = cli("run", str(write(isolated, config)))
    assert result.code == 2, result.err
    assert expected in result.err and len(result.err.strip().splitlines()) == 1
    assert not (isolated / "run").exists()  # not even a data stage's .attempt


@pytest.mark.parametrize(
    ("pairs", "weighting", "named"),
    [
        ({"weight": "one"}, "sigmoid", "pairs.weight: one"),
        ({"weight": "sigmoid"}, "one", "pairs.weight: sigmoid"),
        ({"rule": "format"}, "sigmoid", "the format rule's weight 1"),
    ],
)
def test_contradicting_pair_weights_are_refused(
    cli, isolated: Path, tiny_llama_dir: Path, pairs: dict, weighting: str, named: str
) -> None:
    """The trainer takes the pairs file's weights; a train.weighting that would recompute other
    ones is a contradiction, refused before any work with both keys named."""
    config = tiny_config(tiny_llama_dir)
    config["pairs"] |= pairs
    config["train"]["weighting"] = weighting
    contradicting = write(isolated, config)
    result = cli("run", str(contradicting))
    assert result.code == 2, result.err
    assert "field 'train.weighting'" in result.err and named in result.err
    assert not (isolated / "run" / "generate").exists()
    # `train dpo --config` on the same file refuses it too (it used to train with it)
    where = ["--data", isolated / "pairs.jsonl", "--output-dir", isolated / "out"]
    result = cli("train", "dpo", "--config", contradicting, *where)
    assert result.code == 2 and "field 'train.weighting'" in result.err and named in result.err
    assert not (isolated / "out").exists()
    config["train"]["weighting"] = "one" if pairs.get("rule") == "format" else pairs["weight"]
    from persona_align.config import load_config
    from persona_align.pipeline import check_config

    path = write(isolated, config)
    check_config(load_config(path), path)  # agreeing settings pass
    config["pairs"]["weight"] = "sigmoid"
    if pairs.get("rule") == "format":  # the format rule ignores pairs.weight: refused too
        with pytest.raises(InputError, match=r"field 'pairs\.weight'"):
            check_config(load_config(write(isolated, config)), path)


@pytest.mark.parametrize("name", ["quickstart", "persodpo", "pal", "sbs"])
def test_shipped_configs_validate(name: str) -> None:
    from persona_align.config import load_config
    from persona_align.pipeline import check_config, preflight

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = load_config(path)
    if name in ("quickstart", "persodpo"):
        check_config(config, path)
        preflight(config, path)
    else:
        assert getattr(config, name) is not None


def test_a_bad_row_leaves_no_stage_folder(cli, isolated: Path, tiny_llama_dir: Path) -> None:
    (isolated / "bad.jsonl").write_text('{"id": "a", "persona": ["I sing."], "context": []}\n')
    config = tiny_config(tiny_llama_dir, **{"data.train": "bad.jsonl"})
    result = cli("run", str(write(isolated, config)))
    assert result.code == 2 and "bad.jsonl:line 1: field 'context'" in result.err
    assert not (isolated / "run").exists()  # the data stage's folder and .attempt are gone


def test_manifests_keep_no_credentials(cli, isolated: Path, tiny_llama_dir: Path) -> None:
    """A base URL with a key in it drives the run, but the manifest written to disk shows it
    redacted (configs are meant to be shared; manifests sit beside the outputs)."""
    from persona_align.testing.fake_server import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        url = server.base_url.replace("http://", "http://sk-user-SECRET:pw-SECRET@")
        responders = [{"kind": "openai", "model": "m", "base_url": url, "name": "api"}]
        config = tiny_config(tiny_llama_dir, score=None, pairs=None, train=None, evaluate=None,
                             report=None, **{"generate.responders": responders})  # fmt: skip
        result = cli("run", str(write(isolated, config)), "--json")
    assert result.code == 0, result.err
    written = (isolated / "run" / "generate" / "manifest.json").read_text()
    assert "SECRET" not in written and "***@127.0.0.1" in written
    assert "SECRET" not in result.out + result.err
