"""On a CUDA machine: the metric models and the decoder give there what they give on the CPU.

Marked ``gpu`` and skipped without CUDA (``benchmarks/gpu_check.sh`` runs them on a GPU
machine). Written without a GPU to run them on: their first run is part of that check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPLIES = [
    "Since you love cats, the cat cafe in the Marais is a must.",
    "The museum opens at nine and closes at six.",
    "As someone who can't stand cats, you may want to skip the cat cafe.",
]
PERSONA = ["I love cats.", "I live in Paris."]


def test_c_judge_on_cuda_matches_cpu() -> None:
    from persona_align import devices
    from persona_align.metrics import nli
    from persona_align.metrics.judges import c_pair

    pairs = [c_pair(PERSONA, "user", [], reply) for reply in REPLIES]
    on_gpu = nli.PairClassifier("embedded-c-judge")
    on_gpu.load()
    assert on_gpu.model.device.type == "cuda"
    found = on_gpu.probabilities(pairs)
    assert isinstance(found, np.ndarray)  # back on the CPU
    devices.configure("cpu")
    on_cpu = nli.PairClassifier("embedded-c-judge")
    on_cpu.load()
    np.testing.assert_allclose(found, on_cpu.probabilities(pairs), atol=1e-3)


def test_coherence_judge_on_cuda_matches_cpu() -> None:
    from persona_align.metrics.coherence_judge import CoherenceJudge, coherence_input
    from persona_align.metrics.nli import embedded_dir
    from persona_align.records import Turn

    context = [Turn(speaker="User1", text="What should I see in Paris?")]
    inputs = [coherence_input(context, reply, PERSONA) for reply in REPLIES]
    judge = CoherenceJudge(embedded_dir("embedded-coh-judge"))
    judge.load()
    assert judge._encoder.device.type == "cuda"
    found = judge.probabilities(inputs)
    judge._encoder.to("cpu")
    np.testing.assert_allclose(found, judge.probabilities(inputs), atol=1e-3)


def test_p_static_on_cuda_matches_cpu() -> None:
    from persona_align.metrics.base import ScoreItem
    from persona_align.metrics.persona_distance import PersonaDistance
    from persona_align.records import Candidate, Dialogue

    dialogue = Dialogue(id="d", persona=PERSONA, context=[{"speaker": "User1", "text": "Hi"}])
    items = [
        ScoreItem(
            dialogue, Candidate(dialogue_id="d", responder="r", raw=r, response=r, valid=True)
        )
        for r in REPLIES
    ]
    metric = PersonaDistance(backend="static")
    metric.load()
    assert metric._encoder.device.type == "cuda"
    found = metric.score(items)
    metric._encoder.to("cpu")
    metric._pieces.clear()
    np.testing.assert_allclose(found, metric.score(items), atol=1e-4)


def test_slot_decoding_on_cuda_equals_generate(lively_llama_dir: Path) -> None:
    from persona_align.generation.slots import slot_generate
    from persona_align.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(lively_llama_dir))
    model.to("cuda")
    prompts = [tokenizer(f"Tell me about bees{' please' * i}").input_ids for i in range(5)]
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt], device="cuda"),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device="cuda"),
                max_new_tokens=8, do_sample=False, eos_token_id=[-1], pad_token_id=0,
            )  # fmt: skip
            expected.append(out[0, len(prompt) :].tolist())
    got = {i: t for i, t, _ in slot_generate(model, prompts, max_new_tokens=8, eos_ids={-1},
                                             slots=3)}  # fmt: skip
    assert [got[i] for i in range(len(prompts))] == expected


def test_every_kind_of_model_loads_on_cuda(tiny_llama_dir: Path) -> None:
    """auto picks cuda, and the dtype default there is bf16 where the GPU has it."""
    from persona_align import devices
    from persona_align.metrics.coherence_judge import CoherenceJudge
    from persona_align.metrics.nli import NLIModel, PairClassifier, embedded_dir
    from persona_align.metrics.persona_distance import PersonaDistance
    from persona_align.models import load_causal_lm

    assert devices.current() == "cuda"
    model, _ = load_causal_lm(str(tiny_llama_dir))
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    nli, judge = NLIModel("embedded-nli"), PairClassifier("embedded-c-judge")
    nli.load()
    judge.load()
    coherence = CoherenceJudge(embedded_dir("embedded-coh-judge"))
    coherence.load()
    p_static = PersonaDistance(backend="static")
    p_static.load()
    for loaded in (model, nli.model, judge.model, coherence._encoder, p_static._encoder):
        assert {p.device.type for p in loaded.parameters()} == {"cuda"}


def test_a_weighted_dpo_step_on_cuda(tmp_path: Path, tiny_llama_dir: Path, pairs_file) -> None:
    from persona_align.config import TrainConfig
    from persona_align.training.dpo import train_dpo

    pairs = pairs_file([0.5 + i for i in range(4)])
    summary = train_dpo(
        TrainConfig(
            model=str(tiny_llama_dir), data=pairs, output_dir=tmp_path / "run", max_steps=2,
            batch_size=2, grad_accum=1, save_steps=5,
        )
    )  # fmt: skip
    assert summary["device"] == "cuda" and summary["steps"] == 2
