"""Slot decoding (continuous batching) against ``model.generate`` run on one prompt at a time."""

from pathlib import Path

import pytest
import torch

from persona_align.generation import GenerationParams
from persona_align.generation.hf import generate_texts
from persona_align.generation.slots import slot_generate, supported
from persona_align.models import load_causal_lm
from persona_align.prompting import MIN_SHARED_PREFIX, shared_prefix
from persona_align.records import Dialogue

# seven prompts of different lengths sharing the PersoBench instructions, more than the slots
DIALOGUES = [
    Dialogue(
        id=f"d{i}",
        persona=["I keep bees.", "I live by the sea."][: 1 + i % 2],
        context=[{"speaker": "User1", "text": "Tell me about yourself" + " please" * (3 * i)}],
    )
    for i in range(7)
]


@pytest.fixture
def tiny(lively_llama_dir: Path):
    return load_causal_lm(str(lively_llama_dir))


def alone(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """What ``generate`` gives for one prompt with no batch around it, cut after the end token."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(eos),
            pad_token_id=0,
        )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))]


def test_slots_give_each_prompts_own_greedy_reply(tiny) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    assert shared_prefix(prompts) >= MIN_SHARED_PREFIX and len({len(p) for p in prompts}) == len(
        prompts
    )
    # end tokens taken from the middle of the free-running replies, so replies end at
    # different steps and freed slots take the next prompt while others are still going
    free = [alone(model, p, 12, {-1}) for p in prompts]
    eos = {free[0][3], free[1][6], free[2][1]}
    expected = [alone(model, p, 12, eos) for p in prompts]
    assert len({len(e) for e in expected}) >= 3, "replies should end at different steps"

    for slots, guesses in [(3, 4), (3, 0), (1, 4), (8, 2)]:
        got = {
            index: tokens
            for index, tokens, seconds in slot_generate(
                model, prompts, max_new_tokens=12, eos_ids=eos, slots=slots, guesses=guesses
            )
        }
        assert [got[i] for i in range(len(prompts))] == expected, (slots, guesses)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
def test_short_budgets_end_exactly(tiny, max_new_tokens: int) -> None:
    """Guesses never carry a reply past ``max_new_tokens``."""
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    expected = [alone(model, p, max_new_tokens, {-1}) for p in prompts]
    got = _replies(model, prompts, guesses=4, max_new_tokens=max_new_tokens)
    assert [got[i] for i in range(len(prompts))] == expected


def test_hf_path_uses_slots_and_matches_generate(tiny, monkeypatch) -> None:
    from persona_align.generation import slots

    model, tokenizer = tiny
    calls = []
    original = slots.slot_generate
    monkeypatch.setattr(
        slots, "slot_generate", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    params = GenerationParams(max_new_tokens=8)
    from persona_align.prompting import persobench_messages

    messages = [persobench_messages(d) for d in DIALOGUES]
    results = generate_texts(model, tokenizer, messages, params, batch_size=4)
    assert calls == [1]
    monkeypatch.setattr(slots, "supported", lambda *a: False)  # the padded generate path
    padded = generate_texts(model, tokenizer, messages, params, batch_size=4)
    assert [r.raw for r in results] == [r.raw for r in padded]
    assert all(r.latency_s and r.latency_s > 0 for r in results)
    assert [r.usage["completion_tokens"] for r in results] == [8] * len(DIALOGUES)


def test_sampling_is_seeded(tiny) -> None:
    model, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]

    def run(seed: int) -> dict[int, list[int]]:
        return {
            i: t
            for i, t, _ in slot_generate(
                model, prompts, max_new_tokens=6, eos_ids={-1}, slots=2, temperature=1.0, seed=seed
            )
        }

    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = {i: t for i, t, _ in slot_generate(model, prompts, max_new_tokens=6, eos_ids={-1})}
    assert run(1) != greedy


def test_unsupported_models_fall_back(tiny) -> None:
    model, _ = tiny
    assert supported(model, 100)
    model.generation_config.repetition_penalty = 1.3  # a processor the slots do not apply
    assert not supported(model, 100)
    model.generation_config.repetition_penalty = 1.0
    model.config.sliding_window = 64
    assert supported(model, 64) and not supported(model, 65)
    model.config.sliding_window = None
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert not supported(model, 10)


def _prompts(tokenizer) -> list[list[int]]:
    from persona_align.prompting import persobench_messages, render_chat

    return [
        tokenizer(
            render_chat(tokenizer, persobench_messages(d)), add_special_tokens=False
        ).input_ids
        for d in DIALOGUES
    ]


def _replies(model, prompts, guesses: int, max_new_tokens: int = 16) -> dict[int, list[int]]:
    return {
        i: t
        for i, t, _ in slot_generate(
            model, prompts, max_new_tokens=max_new_tokens, eos_ids={-1}, slots=3, guesses=guesses
        )
    }


def _counting_steps(monkeypatch) -> list[int]:
    """Tokens fed per row in each decode step, recorded as the decoder runs."""
    from persona_align.generation import slots

    fed: list[int] = []
    original = slots.SlotDecoder.step

    def step(self, tokens):
        fed.append(len(tokens[0]))
        return original(self, tokens)

    monkeypatch.setattr(slots.SlotDecoder, "step", step)
    return fed


def test_looked_up_guesses_save_steps_and_change_nothing(tiny, monkeypatch) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    fed = _counting_steps(monkeypatch)
    plain = _replies(model, prompts, guesses=0, max_new_tokens=24)
    plain_steps = len(fed)
    assert set(fed) == {1}
    fed.clear()
    assert _replies(model, prompts, guesses=4, max_new_tokens=24) == plain
    assert max(fed) > 1 and len(fed) < plain_steps  # guesses were fed, and some were right
    assert model.config._attn_implementation == "sdpa"  # restored after the run


def test_wrong_guesses_are_thrown_away(tiny, monkeypatch) -> None:
    from persona_align.generation import slots

    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    plain = _replies(model, prompts, guesses=0)
    fed = _counting_steps(monkeypatch)
    monkeypatch.setattr(slots._Lookup, "guess", lambda self, most: [7, 8, 9, 10][:most])
    assert _replies(model, prompts, guesses=4) == plain
    assert max(fed) == 5


def test_lookup_copies_what_followed_the_latest_match() -> None:
    from persona_align.generation.slots import _Lookup, _Replies

    lookup = _Lookup([1, 2, 3, 4, 9, 2, 3, 5, 6])
    lookup.push(2)
    lookup.push(3)
    assert lookup.guess(3) == [5, 6, 2]  # "2 3" last came before 5 6, the latest match wins
    assert lookup.guess(0) == []
    replies = _Replies()
    replies.add([40, 41, 42, 43], most=4)
    other = _Lookup([50, 51], replies)
    other.push(40)
    assert other.guess(2) == [41, 42]  # from another prompt's finished reply
    assert _Lookup([50, 51]).guess(2) == []


def test_packed_attention_equals_repeated_heads() -> None:
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv

    from persona_align.generation.slots import _packed_attention

    torch.manual_seed(0)
    query = torch.randn(2, 6, 4, 8)
    key, value = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    visible = torch.rand(2, 1, 4, 10) > 0.3
    visible[..., 0] = True
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    got, _ = _packed_attention(module, query, key, value, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 2), repeat_kv(value, 2), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_guesses_through_the_models_own_attention(tiny) -> None:
    """A model on eager attention keeps it; several tokens per row still give the same replies."""
    model, tokenizer = tiny
    model.set_attn_implementation("eager")
    prompts = _prompts(tokenizer)[:4]
    assert _replies(model, prompts, guesses=4) == _replies(model, prompts, guesses=0)
    assert model.config._attn_implementation == "eager"


def test_prompts_join_and_leave_between_steps(tiny) -> None:
    """A server's use: prompts added while others decode, one dropped half-way; every reply is
    still the prompt's own, and the rows and their length grow as prompts need."""
    from persona_align.generation.slots import SlotBatch

    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    expected = [alone(model, p, 10, {-1}) for p in prompts]
    batch = SlotBatch(model, 3, eos_ids={-1})
    with torch.inference_mode(), batch:
        batch.set_prefix(prompts[0][: shared_prefix(prompts)])
        rows = {0: batch.add(0, prompts[0], 10)}
        batch.step()
        rows[6] = batch.add(6, prompts[6], 10)  # the longest prompt, a step late
        gone = batch.add(2, prompts[2], 10)
        batch.step()
        batch.drop(gone)
        rows[4] = batch.add(4, prompts[4], 10)  # takes the dropped prompt's slot
        assert batch.free == 0
        while batch.busy:
            batch.step()
    assert {k: row.tokens for k, row in rows.items()} == {k: expected[k] for k in rows}
    assert len(gone.tokens) < 10 and batch.free == 3
    assert batch.decoder.slots == 3 and batch.decoder.capacity >= len(prompts[6]) + 10
