"""`train pal` and `train sbs` end to end through the CLI: stage outputs, the stage-2 reference,
resumable reruns, counts in the summary, and bad configs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import TrainerCallback

from persona_align.cli import main
from persona_align.config import load_config
from persona_align.models import load_causal_lm
from persona_align.preference.pal import PersonaLabel, plain_messages
from persona_align.preference.sbs import TASK, sbs_messages
from persona_align.prompting import messages_hash
from persona_align.records import (
    Candidate,
    Dialogue,
    PreferencePair,
    SFTExample,
    read_records,
)
from persona_align.training.curves import read_training_log

SAMPLE = Path(str(resources.files("persona_align") / "sample_data"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROBE_TEXT = "Do you like bees? I keep a lighthouse."
PAL_STAGES = ["labels", "sft", "stage1", "rejected", "pairs", "stage2", "evaluate"]
TINY_LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def run_cli(*args: str) -> tuple[int, dict[str, Any] | None]:
    """The CLI in-process outside a test function (module fixtures): exit code, --json summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    lines = out.getvalue().strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 and lines else None)


def write_config(folder: Path, sections: dict[str, Any]) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(sections), encoding="utf-8")
    return path


def pal_section(model: Path, output_dir: str = "pal-run") -> dict[str, Any]:
    trainer = {"max_steps": 2, "batch_size": 1, "lora": TINY_LORA, "save_steps": 50}
    return {
        "model": str(model),
        "dialogues": str(SAMPLE / "train.jsonl"),
        "max_dialogues": 4,
        "output_dir": output_dir,
        "data": {"response_format": "text"},
        "stage1": {**trainer, "learning_rate": 1e-3},
        # a random tiny model greedily writes blank lines: sampling gives it words to reject
        "rejected": {"max_new_tokens": 4, "temperature": 1.0},
        "stage2": {**trainer, "max_steps": 1},
        "evaluate": {
            "dialogues": str(SAMPLE / "valid.jsonl"),
            "max_dialogues": 2,
            "decode": {"max_new_tokens": 4},
        },
    }


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        return model(ids).logits.float().cpu()


class ReferenceProbe(TrainerCallback):
    """Captures what TRL's reference computes at the start of stage 2 (adapter disabled)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.reference: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        with model.disable_adapter():
            self.reference = logits(model, self.tokenizer)


@pytest.fixture(scope="module")
def pal_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Any]:
    """One PAL run through the CLI, with a probe on stage 2's reference model."""
    from persona_align.models import load_tokenizer
    from persona_align.training import dpo

    folder = tmp_path_factory.mktemp("pal")
    config = write_config(folder, {"pal": pal_section(tiny_llama_dir)})
    probe = ReferenceProbe(load_tokenizer(str(tiny_llama_dir)))
    original = dpo.train_dpo

    def probed(config: Any, resume: bool = False, extra_callbacks: Any = ()) -> Any:
        return original(config, resume, [*extra_callbacks, probe])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpo, "train_dpo", probed)
        code, summary = run_cli("train", "pal", "--config", config, "--json")
    assert code == 0
    return {"folder": folder, "config": config, "summary": summary, "probe": probe}


def test_pal_writes_every_stage_output(pal_run: dict[str, Any]) -> None:
    run = pal_run["folder"] / "pal-run"
    for name in ("labels.jsonl", "sft.jsonl", "rejected.jsonl", "pairs.jsonl",
                 "stage1/model/adapter_config.json", "stage1/log.jsonl", "stage1/summary.json",
                 "stage2/model/adapter_config.json", "stage2/curves.png", "eval/labels.jsonl",
                 "eval/selections.jsonl", "eval/candidates.jsonl", "manifest.json"):  # fmt: skip
        assert (run / name).exists(), name
    summary = pal_run["summary"]
    assert summary["ran"] == PAL_STAGES and summary["skipped"] == []
    assert json.loads((run / "summary.json").read_text()) == summary


def test_pal_summary_counts_match_the_files(pal_run: dict[str, Any]) -> None:
    run, summary = pal_run["folder"] / "pal-run", pal_run["summary"]
    dialogues = read_records(SAMPLE / "train.jsonl", Dialogue)[:4]
    labels = read_records(run / "labels.jsonl", PersonaLabel)
    assert summary["dialogues"] == 4
    assert summary["labels"]["labelled"] == len(labels) == 4  # all have a gold reply
    assert summary["labels"]["nli"] == 4 and summary["labels"]["grounding"] == 0

    examples = read_records(run / "sft.jsonl", SFTExample)
    per_task = {t: sum(e.task == t for e in examples) for t in summary["sft"]["examples"]}
    assert summary["sft"]["examples"] == per_task and summary["sft"]["total"] == len(examples)
    assert set(summary["sft"]["skipped"]) == set(per_task)  # skipped counts, per task
    assert summary["stage1"]["tasks"] == {t: n for t, n in per_task.items() if n}

    rejected = read_records(run / "rejected.jsonl", Candidate)
    assert [c.dialogue_id for c in rejected] == [d.id for d in dialogues]
    assert [c.prompt_hash for c in rejected] == [
        messages_hash(plain_messages(d, "text")) for d in dialogues
    ]  # the no-persona prompt, as stage 1 was trained on
    assert summary["rejected"]["replies"] == 4
    assert summary["rejected"]["valid"] == sum(c.valid for c in rejected)

    pairs = read_records(run / "pairs.jsonl", PreferencePair)
    assert summary["pairs"]["pairs"] == len(pairs) == summary["stage2"]["pairs"]
    assert summary["pairs"]["dropped_total"] == 4 - len(pairs)
    by_id = {d.id: d for d in dialogues}
    for pair in pairs:
        assert pair.rule == "pal" and pair.chosen[0].content == by_id[pair.dialogue_id].reference

    evaluation = summary["evaluate"]
    candidates = read_records(run / "eval" / "candidates.jsonl", Candidate)
    assert evaluation["replies"] == len(candidates) == 2
    assert evaluation["selection"]["n"] == 2
    assert evaluation["selection"]["always_none_exact_accuracy"] is not None
    answers = summary["sft"]["select_answers"]
    assert answers["none"] == answers["persona"] == summary["sft"]["examples"]["select"] / 2
    assert evaluation["selection_mode"] == "predicted"


def test_stage2_trains_on_top_of_the_stage1_model(
    pal_run: dict[str, Any], tiny_llama_dir: Path
) -> None:
    run = pal_run["folder"] / "pal-run"
    meta = json.loads((run / "stage2" / "model" / "persona-align.json").read_text())
    assert meta["base_model"] == str((run / "stage1" / "model").resolve())
    # first DPO step: policy == reference, so the unweighted loss is exactly log 2
    first = next(e for e in read_training_log(run / "stage2" / "log.jsonl") if "loss" in e)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert pal_run["summary"]["stage2"]["weighting"] == "one"
    # and that reference is the stage-1 model (merged), which differs from the base model
    stage1 = logits(*load_causal_lm(str(run / "stage1" / "model")))
    base = logits(*load_causal_lm(str(tiny_llama_dir)))
    reference = pal_run["probe"].reference
    assert reference is not None
    assert torch.allclose(reference, stage1, atol=1e-5)
    assert not torch.allclose(stage1, base, atol=1e-5)
    stage2 = logits(*load_causal_lm(str(run / "stage2" / "model")))
    assert not torch.allclose(stage2, stage1, atol=1e-6)  # stage 2 loads over stage 1 and moved


@pytest.mark.parametrize("precompute", [False, True])
def test_full_finetune_stage2_takes_the_stage1_model_as_reference(
    cli, pal_run: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path, precompute: bool
) -> None:
    """Without precomputed log-probs TRL rebuilds the reference from the merged stage-1 model's
    ``_name_or_path``, which names the original base; stage 2 must still pull against stage 1."""
    run = tmp_path / "pal-run"
    shutil.copytree(pal_run["folder"] / "pal-run", run, ignore=shutil.ignore_patterns("stage2"))
    section = pal_section(tiny_llama_dir)
    del section["evaluate"]
    section["stage2"] |= {"finetune": "full", "precompute_ref": precompute}
    result = cli("train", "pal", "--config", write_config(tmp_path, {"pal": section}), "--json")
    assert result.code == 0, result.err
    assert result.summary["ran"] == ["stage2"]
    # first step: policy == reference == the stage-1 model, so no reward and loss log 2
    first = next(e for e in read_training_log(run / "stage2" / "log.jsonl") if "loss" in e)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-5)


def test_pal_rerun_skips_finished_stages(
    cli, pal_run: dict[str, Any], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    run = tmp_path / "pal-run"
    shutil.copytree(pal_run["folder"] / "pal-run", run)
    section = pal_section(tiny_llama_dir)
    config = write_config(tmp_path, {"pal": section})
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    again = cli("train", "pal", "--config", config, "--json")
    assert again.code == 0, again.err
    assert again.summary["ran"] == [] and again.summary["skipped"] == PAL_STAGES
    for key in ("labels", "sft", "pairs", "rejected"):
        assert again.summary[key] == pal_run["summary"][key]
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert changed == [run / "summary.json"]

    section["evaluate"]["decode"]["max_new_tokens"] = 3  # only the evaluation depends on it
    write_config(tmp_path, {"pal": section})
    partial = cli("train", "pal", "--config", config, "--json")
    assert partial.code == 0, partial.err
    assert partial.summary["ran"] == ["evaluate"]

    section["stage2"]["beta"] = 0.5  # a trained stage with other settings is never mixed
    write_config(tmp_path, {"pal": section})
    refused = cli("train", "pal", "--config", config)
    assert refused.code == 2
    assert "stage2" in refused.err and "other settings" in refused.err


def sbs_section(model: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "dialogues": str(SAMPLE / "train.jsonl"),
        "max_dialogues": 4,
        "output_dir": "sbs-run",
        "data": {"max_augmentations": 1},
        "train": {"max_steps": 3, "batch_size": 1, "lora": TINY_LORA, "save_steps": 1},
        "evaluate": {
            "dialogues": str(SAMPLE / "valid.jsonl"),
            "max_dialogues": 2,
            "decode": {"max_new_tokens": 4},
        },
    }


class CrashAt(TrainerCallback):
    """Fails at step 2, after step 1's checkpoint was saved."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("simulated crash")


def test_sbs_end_to_end_with_a_crash_and_resume(
    cli, tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from persona_align.training import sft

    config = write_config(tmp_path, {"sbs": sbs_section(tiny_llama_dir)})
    original = sft.train_sft
    monkeypatch.setattr(sft, "train_sft", lambda c, resume=False: original(c, resume, [CrashAt()]))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli("train", "sbs", "--config", config)
    monkeypatch.setattr(sft, "train_sft", original)
    run = tmp_path / "sbs-run"
    assert (run / "sft.jsonl").exists() and (run / "train" / "checkpoint-1").is_dir()

    fresh = cli("train", "sbs", "--config", config)  # checkpoints there: only with --resume
    assert fresh.code == 2 and "--resume" in fresh.err
    result = cli("train", "sbs", "--config", config, "--resume", "--json")
    assert result.code == 0, result.err
    summary = result.summary
    assert summary["skipped"] == ["augment"] and summary["ran"] == ["train", "evaluate"]
    assert summary["train"]["resumed_from"] == "checkpoint-1" and summary["train"]["steps"] == 3

    examples = read_records(run / "sft.jsonl", SFTExample)
    augment = summary["augment"]
    assert augment["examples"] == len(examples) == summary["train"]["examples"]
    assert augment["originals"] == sum(e.meta["kind"] == "original" for e in examples) == 4
    assert augment["augmentations"] == sum(e.meta["kind"] == "augmented" for e in examples)
    assert augment["nouns_masked"] <= 4  # max_augmentations: 1 per response
    assert {e.task for e in examples} == {TASK}
    assert (run / "train" / "model" / "adapter_config.json").exists()

    valid = read_records(SAMPLE / "valid.jsonl", Dialogue)[:2]
    candidates = read_records(run / "eval" / "candidates.jsonl", Candidate)
    assert [c.prompt_hash for c in candidates] == [
        messages_hash(sbs_messages(d, 1.0)) for d in valid
    ]  # inference asks for the top score
    assert summary["evaluate"]["replies"] == 2 and summary["evaluate"]["score"] == 1.0

    again = cli("train", "sbs", "--config", config, "--json")
    assert again.code == 0 and again.summary["ran"] == []
    assert again.summary["skipped"] == ["augment", "train", "evaluate"]


@pytest.mark.parametrize(
    ("sections", "command", "named"),
    [
        ({"pal": {"dialogues": "d.jsonl", "output_dir": "o", "stage1": {"learning_rat": 1}}},
         "pal", "pal.stage1.learning_rat"),
        ({"pal": {"dialogues": "d.jsonl", "output_dir": "o", "data": {"ratio": {}}}},
         "pal", "pal.data.ratio"),
        ({"pal": {"dialogues": "d.jsonl", "output_dir": "o", "evaluate": {"selection": "x"}}},
         "pal", "pal.evaluate"),
        ({"sbs": {"dialogues": "d.jsonl", "output_dir": "o", "data": {"fillr": "chat"}}},
         "sbs", "sbs.data.fillr"),
        ({"sbs": {"dialogues": "d.jsonl", "output_dir": "o", "train": {"beta": "high"}}},
         "sbs", "sbs.train.beta"),
        ({"sbs": {"dialogues": "d.jsonl", "output_dir": "o"}}, "pal", "pal"),
        ({"pal": {"dialogues": "missing.jsonl", "output_dir": "o"}}, "pal", "missing.jsonl"),
    ],
)  # fmt: skip
def test_bad_configs_exit_2_naming_the_key(
    cli, tmp_path: Path, sections: dict, command: str, named: str
) -> None:
    result = cli("train", command, "--config", write_config(tmp_path, sections))
    assert result.code == 2
    assert named in result.err and len(result.err.strip().splitlines()) == 1


def test_shipped_configs_point_at_the_sample_data() -> None:
    pal = load_config(CONFIGS / "pal.yaml").pal
    sbs = load_config(CONFIGS / "sbs.yaml").sbs
    assert pal is not None and sbs is not None
    for section in (pal, sbs):
        assert section.model == "embedded"
        assert section.dialogues.resolve() == (SAMPLE / "train.jsonl").resolve()
        assert section.evaluate is not None
        assert section.evaluate.dialogues.resolve() == (SAMPLE / "valid.jsonl").resolve()
        assert section.output_dir.resolve().parent == (CONFIGS.parent / "runs").resolve()
    assert pal.stage2.weighting == "one" and pal.data.response_format == "json"


def test_run_takes_a_method_config(cli, tmp_path: Path, tiny_llama_dir: Path) -> None:
    config = write_config(tmp_path, {"sbs": sbs_section(tiny_llama_dir)})
    first = cli("run", config, "--json")
    assert first.code == 0, first.err
    assert first.summary["methods"]["sbs"]["ran"] == ["augment", "train", "evaluate"]
    again = cli("run", config, "--json")
    assert again.code == 0 and again.summary["methods"]["sbs"]["ran"] == []
    assert cli("run", config, "--from", "train").code == 2
    mixed = write_config(tmp_path, {"sbs": sbs_section(tiny_llama_dir), "name": "x",
                                    "data": {"train": "sample:train"}})  # fmt: skip
    result = cli("run", mixed)
    assert result.code == 2 and "not both" in result.err
