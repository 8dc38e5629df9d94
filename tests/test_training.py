"""Training runs end to end: LoRA and full DPO, SFT, resume after a crash, logs, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from persona_align.config import TrainConfig
from persona_align.errors import InputError
from persona_align.models import load_causal_lm
from persona_align.records import PreferencePair, SFTExample, write_records
from persona_align.training.common import device_defaults, trainer_arguments
from persona_align.training.curves import read_training_log
from persona_align.training.dpo import pair_weights, train_dpo
from persona_align.training.sft import train_sft

QUESTIONS = ["Do you like bees?", "Where do you live?", "What is your job?", "Any pets?"]


def pairs_file(folder: Path, n: int = 8, **changes: object) -> Path:
    pairs = [
        PreferencePair(
            dialogue_id=f"d{i}",
            prompt=[{"role": "user", "content": f"{QUESTIONS[i % 4]} ({i})"}],
            chosen=[{"role": "assistant", "content": "Yes, I keep three hives by the sea."}],
            rejected=[{"role": "assistant", "content": "No. " * (i + 1)}],
            score_chosen=0.5 + i / 20,
            score_rejected=0.2,
            weight=0.3,
            rule="quantile",
        ).model_copy(update=changes)
        for i in range(n)
    ]
    path = folder / "pairs.jsonl"
    write_records(path, pairs, PreferencePair)
    return path


def config(folder: Path, model: Path, **overrides: object) -> TrainConfig:
    if "data" not in overrides:
        overrides["data"] = pairs_file(folder)
    values = {"output_dir": folder / "run", "model": str(model),
              "max_steps": 4, "save_steps": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}  # fmt: skip
    return TrainConfig(**{**values, **overrides})


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "adapter_model.safetensors")


def test_lora_dpo_run_writes_adapter_log_curves_and_summary(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    summary = train_dpo(config(tmp_path, tiny_llama_dir))
    run = tmp_path / "run"
    assert summary["steps"] == 4 and summary["pairs"] == 8
    assert (run / "model" / "adapter_config.json").exists()
    meta = json.loads((run / "model" / "persona-align.json").read_text())
    assert meta["base_model"] == str(tiny_llama_dir.resolve())
    log = [e for e in read_training_log(run / "log.jsonl") if "loss" in e]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert {"rewards/margins", "rewards/accuracies", "grad_norm", "logps/chosen"} <= set(log[0])
    assert (run / "curves.png").stat().st_size > 1000 and "rewards/margins" in summary["curves"]
    # the adapter loads over its base and changes what the model computes
    trained, tokenizer = load_causal_lm(str(run / "model"))
    base, _ = load_causal_lm(str(tiny_llama_dir))
    ids = tokenizer("Do you like bees?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, base(ids).logits)


@pytest.mark.parametrize(("norm", "weight"), [("none", 0.3), ("mean", 1.0)])
def test_first_step_loss_is_the_stock_loss_times_the_pairs_file_weight(
    tmp_path: Path, tiny_llama_dir: Path, norm: str, weight: float
) -> None:
    # at step 1 the policy equals the reference, so each pair's DPO loss is log 2; by default
    # the weight is the file's (0.3 for every pair), not one recomputed from the scores
    summary = train_dpo(config(tmp_path, tiny_llama_dir, weight_norm=norm, max_steps=1))
    assert summary["weighting"] == "column:weight" and summary["weight_norm"] == norm
    first = read_training_log(tmp_path / "run" / "log.jsonl")[0]
    assert first["loss"] == pytest.approx(weight * torch.log(torch.tensor(2.0)).item(), rel=1e-4)


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    straight = tmp_path / "straight"
    crashed = tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    train_dpo(config(straight, tiny_llama_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dpo(config(crashed, tiny_llama_dir), extra_callbacks=[CrashAt(3)])
    assert (crashed / "run" / "checkpoint-2").is_dir()
    with pytest.raises(InputError, match="--resume"):
        train_dpo(config(crashed, tiny_llama_dir))
    summary = train_dpo(config(crashed, tiny_llama_dir), resume=True)
    assert summary["resumed_from"] == "checkpoint-2"
    a, b = adapter(straight / "run"), adapter(crashed / "run")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [e["step"] for e in read_training_log(crashed / "run" / "log.jsonl") if "loss" in e]
    assert steps == [1, 2, 3, 4]


def test_precomputed_reference_gives_the_same_losses(tmp_path: Path, tiny_llama_dir: Path) -> None:
    losses = {}
    for precompute in (True, False):
        folder = tmp_path / str(precompute)
        folder.mkdir()
        train_dpo(config(folder, tiny_llama_dir, precompute_ref=precompute, max_steps=2))
        log = read_training_log(folder / "run" / "log.jsonl")
        losses[precompute] = [e["loss"] for e in log if "loss" in e]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_full_finetune_saves_a_plain_checkpoint(tmp_path: Path, tiny_llama_dir: Path) -> None:
    train_dpo(config(tmp_path, tiny_llama_dir, finetune="full", max_steps=1, learning_rate=1e-3))
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").exists()
    assert not (model_dir / "adapter_config.json").exists()
    trained, _ = load_causal_lm(str(model_dir))
    base, _ = load_causal_lm(str(tiny_llama_dir))
    changed = [
        not torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters(), strict=True)
    ]
    assert any(changed)


def test_weightings(tmp_path: Path) -> None:
    from persona_align.training.dpo import load_pairs

    path = pairs_file(tmp_path, n=2)
    pairs, _ = load_pairs(path)
    gap = pairs[1].score_chosen - pairs[1].score_rejected
    assert pair_weights(pairs, "sigmoid", path)[1] == pytest.approx(1 / (1 + 2.718281828**-gap))
    assert pair_weights(pairs, "one", path) == [1.0, 1.0]
    assert pair_weights(pairs, "column:weight", path) == [0.3, 0.3]
    with pytest.raises(InputError, match="unknown weighting"):
        pair_weights(pairs, "column:nope", path)


def test_bad_pairs_are_dropped_counted_or_rejected(tmp_path: Path, tiny_llama_dir: Path) -> None:
    same = pairs_file(tmp_path, n=8)
    lines = same.read_text().splitlines()
    first = json.loads(lines[0])
    first["rejected"] = first["chosen"]
    long_prompt = json.loads(lines[1])
    long_prompt["prompt"][0]["content"] = "bees " * 400
    same.write_text("\n".join([json.dumps(first), json.dumps(long_prompt), *lines[2:]]) + "\n")
    summary = train_dpo(config(tmp_path, tiny_llama_dir, data=same, max_length=128, max_steps=1))
    assert summary["dropped_identical"] == 1
    assert summary["dropped_prompt_too_long"] == 1 and summary["dropped_ids"] == ["d1"]
    assert summary["pairs"] == 6

    missing = tmp_path / "missing.jsonl"
    row = json.loads(lines[2])
    del row["rejected"]
    missing.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match="rejected") as err:
        train_dpo(config(tmp_path, tiny_llama_dir, data=missing, output_dir=tmp_path / "other"))
    assert "line 1" in str(err.value)


def test_cpu_defaults_are_fp32_without_checkpointing(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU machine has GPU defaults")
    args = trainer_arguments(TrainConfig(data=tmp_path / "p", output_dir=tmp_path / "o"))
    assert device_defaults().precision == "fp32"
    assert args["bf16"] is False and args["use_cpu"] is True
    assert args["activation_checkpointing"] is False
    assert args["learning_rate"] == 5e-5


def test_sft_trains_on_completions(tmp_path: Path, tiny_llama_dir: Path) -> None:
    examples = [
        SFTExample(
            dialogue_id=f"d{i}",
            prompt=[{"role": "user", "content": f"{q} Score: 1.0"}],
            completion=[{"role": "assistant", "content": "I keep bees by the sea."}],
            task="select" if i % 2 else "generate-plain",
        )
        for i, q in enumerate(QUESTIONS * 2)
    ]
    data = tmp_path / "sft.jsonl"
    write_records(data, examples, SFTExample)
    summary = train_sft(
        TrainConfig(
            method="sft",
            data=data,
            output_dir=tmp_path / "run",
            model=str(tiny_llama_dir),
            max_steps=3,
            lora={"r": 4, "alpha": 8},
        )
    )
    assert summary["tasks"] == {"select": 4, "generate-plain": 4}
    assert summary["steps"] == 3 and summary["last_loss"] < summary["first_loss"]
    assert (tmp_path / "run" / "model" / "adapter_config.json").exists()


def test_cli_train_dpo_with_config_and_bad_config(
    cli, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    pairs_file(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"method": "dpo", "model": str(tiny_llama_dir),
        "data": "pairs.jsonl", "output_dir": "run", "max_steps": 2}}))  # fmt: skip
    result = cli("train", "dpo", "--config", str(cfg), "--json")
    assert result.code == 0, result.err
    assert result.summary["steps"] == 2 and (tmp_path / "run" / "model").is_dir()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"train": {"method": "dpo", "data": "p", "output_dir": "o",
                                               "beta": "high"}}))  # fmt: skip
    result = cli("train", "dpo", "--config", str(wrong))
    assert result.code == 2 and "train.beta" in result.err
    result = cli("train", "sft", "--config", str(cfg))
    assert result.code == 2 and "train dpo" in result.err


def test_two_cpu_processes_end_with_identical_weights(tmp_path: Path, tiny_llama_dir: Path) -> None:
    pairs_file(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"method": "dpo", "model": str(tiny_llama_dir),
        "data": "pairs.jsonl", "output_dir": "run", "max_steps": 3, "batch_size": 2,
        "learning_rate": 1e-3, "lora": {"r": 4, "alpha": 8}}}))  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "persona_align.cli", "train", "dpo", "--config", str(cfg)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n" + done.stderr[-2000:]
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "ranks").glob("*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    # and training moved the weights: the LoRA B matrices start at zero
    weights = adapter(tmp_path / "run")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_only_the_pairs_the_steps_reach_are_prepared(tmp_path: Path) -> None:
    from persona_align.training.common import rows_for_steps

    rows = [{"i": i} for i in range(20)]
    settings = {"data": tmp_path / "p", "output_dir": tmp_path / "o", "batch_size": 2}
    three_steps = TrainConfig(**settings, max_steps=3, grad_accum=2)
    used = rows_for_steps(rows, three_steps)
    assert len(used) == 12 and used == rows_for_steps(rows, three_steps)  # seeded: resumable
    assert len({r["i"] for r in used}) == 12
    assert rows_for_steps(rows, TrainConfig(**settings, max_steps=50)) == rows
    assert rows_for_steps(rows, TrainConfig(**settings)) == rows  # epochs, not steps
