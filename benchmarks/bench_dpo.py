"""Seconds per optimizer step and peak memory: our DPO trainer vs TRL's stock trainer.

Same model (the embedded SmolLM2), same pairs, batch and sequence length, same run. Ours is
the score-weighted trainer with LoRA and precomputed reference log-probs (the reference pass
runs once before training and is reported apart), with and without running each pair's
prompt once for both replies (``share_prompt``, the default), and the latter again under bf16
autocast (``precision: bf16``). Two stock baselines, TRL's DPOTrainer in fp32: with the same
LoRA config and precomputed reference (the fair one: it differs from ours only in our code),
and fine-tuning every weight against a frozen reference copy. Each configuration runs in its
own process, so peak RSS is its own.

    .venv/bin/python benchmarks/bench_dpo.py [--steps 6] [--batch 2] [--pairs 24]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WEIGHT = 0.6  # every pair's: our first loss / WEIGHT must equal the stock first loss
BASELINES = ("stock-lora-precomputed", "stock-full")  # the fair one first
CONFIGS = (
    *BASELINES,
    "ours-lora-precomputed",
    "ours-lora-precomputed-shared-prompt",
    "ours-lora-precomputed-shared-prompt-bf16",
)


def make_pairs(count: int) -> list[dict[str, Any]]:
    """PersoBench prompts of the bundled sample dialogues; chosen = gold JSON, rejected = bare."""
    from persona_align.pipeline import data_location
    from persona_align.prompting import persobench_messages
    from persona_align.records import Dialogue, read_records

    dialogues = read_records(data_location("sample:train"), Dialogue)
    rows = []
    for dialogue in (dialogues * (count // len(dialogues) + 1))[:count]:
        gold = dialogue.reference or "I see."
        rows.append({
            "prompt": [m.model_dump() for m in persobench_messages(dialogue)],
            "chosen": [{"role": "assistant", "content": json.dumps({"response": gold})}],
            "rejected": [{"role": "assistant", "content": gold}],
            "weight": WEIGHT,
        })  # fmt: skip
    return rows


def run_one(config: str, steps: int, batch: int, pairs: int, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from persona_align.models import load_causal_lm
    from persona_align.training.dpo import WeightedDPOConfig, WeightedDPOTrainer

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm("embedded")
    model.train()
    rows = make_pairs(pairs)
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.began)

    common = {"output_dir": str(out / config), "per_device_train_batch_size": batch,
              "max_steps": steps, "learning_rate": 1e-6, "beta": 0.1, "use_cpu": True,
              "bf16": config.endswith("bf16"), "gradient_checkpointing": False, "report_to": [],
              "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
              "max_length": 1024}  # fmt: skip
    lora = None
    if "lora" in config:
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # fmt: skip
    began = time.perf_counter()
    if config.startswith("stock"):
        trainer = DPOTrainer(
            model=model, args=DPOConfig(**common, precompute_ref_log_probs=lora is not None),
            processing_class=tokenizer, peft_config=lora, callbacks=[Timer()],
            train_dataset=Dataset.from_list(rows).remove_columns("weight"),
        )  # fmt: skip
    else:
        trainer = WeightedDPOTrainer(
            model=model,
            args=WeightedDPOConfig(**common, precompute_ref_log_probs=True,
                                   share_prompt="shared-prompt" in config),
            processing_class=tokenizer, train_dataset=Dataset.from_list(rows), peft_config=lora,
            callbacks=[Timer()],
        )  # fmt: skip
    setup = time.perf_counter() - began
    began = time.perf_counter()
    trainer.train()
    outside_steps = time.perf_counter() - began - sum(step_times)  # incl. the reference pass
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    measured = step_times[1:] or step_times  # the first step pays one-off warm-up costs
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=True,
                                                 return_dict=True)["input_ids"])
               for r in rows[:batch]]  # fmt: skip
    return {
        "config": config,
        "s_per_step": sum(measured) / len(measured),
        "setup_s": setup,
        "outside_steps_s": outside_steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
        "tokens_per_sequence": sum(lengths) / len(lengths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-dpo"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.batch, args.pairs, args.out)))
        return
    results = {}
    for config in CONFIGS:
        done = subprocess.run(
            [sys.executable, __file__, "--one", config, "--steps", str(args.steps),
             "--batch", str(args.batch), "--pairs", str(args.pairs), "--out", str(args.out)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    fair, full = (results[name] for name in BASELINES)
    print(f"embedded SmolLM2-135M, fp32 unless named bf16, batch {args.batch}, {args.steps} steps, "
          f"~{fair['tokens_per_sequence']:.0f} tokens per sequence")  # fmt: skip
    print("| trainer | s / optimizer step | set-up s | train() s outside steps "
          "(reference pass) | peak RSS MB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_step']:.2f} | {r['setup_s']:.1f} | "
              f"{r['outside_steps_s']:.1f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    print()
    for name in CONFIGS[len(BASELINES) :]:
        ours = results[name]
        step = [ours["s_per_step"] / base["s_per_step"] for base in (fair, full)]
        memory = [ours["peak_rss_mb"] / base["peak_rss_mb"] for base in (fair, full)]
        first, stock_first = ours["losses"][0] / WEIGHT, fair["losses"][0]
        print(
            f"{name}: step time {step[0]:.2f}x stock LoRA + precomputed reference (the fair "
            f"baseline), {step[1]:.2f}x stock full fine-tune; peak memory {memory[0]:.2f}x, "
            f"{memory[1]:.2f}x; step-1 loss / weight {first:.5f} vs stock {stock_first:.5f}"
        )
    fp32, bf16 = results[CONFIGS[-2]], results[CONFIGS[-1]]
    step = bf16["s_per_step"] / fp32["s_per_step"]
    outside = bf16["outside_steps_s"] / fp32["outside_steps_s"]
    print(f"bf16 / fp32 (shared prompt): step time {step:.2f}x, reference pass {outside:.2f}x")


if __name__ == "__main__":
    main()
