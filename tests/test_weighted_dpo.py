"""The score-weighted DPO loss really weights: checked against TRL's stock per-pair losses."""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from persona_align.training.dpo import (
    WEIGHT_KEY,
    WeightedDPOConfig,
    WeightedDPOTrainer,
    _pair_slice,
)

PAIRS = [
    ("Do you like bees?", "Yes, I keep three hives.", "No."),
    ("Where do you live?", "By the sea, in a lighthouse.", "I do not know what a home is."),
    ("What is your job?", "I am a nurse on night shifts.", "Cats."),
    ("Any pets?", "A dog named Bo.", "I have never spoken before in my whole life, honestly."),
]


def dataset(weights: list[float]) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
                "weight": w,
            }
            for (q, c, r), w in zip(PAIRS, weights, strict=True)
        ]
    )


@pytest.fixture
def make(tiny_llama_dir: Path, tmp_path: Path):
    def build(weights: list[float], stock: bool = False, share_prompt: bool = True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        common = {"output_dir": str(tmp_path / ("stock" if stock else "weighted")), "report_to": [],
                  "per_device_train_batch_size": 4, "beta": 0.1, "use_cpu": True}  # fmt: skip
        if stock:
            trainer = DPOTrainer(
                model=model,
                args=DPOConfig(**common),
                train_dataset=dataset(weights).remove_columns("weight"),
                processing_class=tokenizer,
            )
        else:
            trainer = WeightedDPOTrainer(
                model=model,
                args=WeightedDPOConfig(**common, share_prompt=share_prompt),
                train_dataset=dataset(weights),
                processing_class=tokenizer,
            )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        return trainer, batch

    return build


def stock_pair_losses(make) -> list[torch.Tensor]:
    stock, batch = make([1.0] * 4, stock=True)
    return [stock._compute_loss(stock.model, _pair_slice(batch, i, 4), False) for i in range(4)]


def test_weighted_loss_is_weighted_mean_of_stock_pair_losses(make) -> None:
    weights = [1.0, 0.0, 0.5, 2.0]
    trainer, batch = make(weights)
    assert batch[WEIGHT_KEY].tolist() == weights
    loss = trainer.compute_loss(trainer.model, dict(batch))
    per_pair = stock_pair_losses(make)
    expected = sum(w * loss_i for w, loss_i in zip(weights, per_pair, strict=True)) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert len({round(loss_i.item(), 6) for loss_i in per_pair}) > 1  # the weights matter


def test_all_ones_reproduce_the_stock_trainer(make) -> None:
    trainer, batch = make([1.0] * 4)
    stock, stock_batch = make([1.0] * 4, stock=True)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    theirs = stock.compute_loss(stock.model, dict(stock_batch))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_zero_weight_pair_contributes_no_gradient(make) -> None:
    def flat(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def grads(weights: list[float]) -> torch.Tensor:
        trainer, batch = make(weights)
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        return flat(trainer.model)

    assert torch.count_nonzero(grads([0.0] * 4)) == 0
    # only pair 0 weighted: the gradient is pair 0's stock gradient / 4, whatever pairs 1-3 hold
    stock, batch = make([1.0] * 4, stock=True)
    (stock._compute_loss(stock.model, _pair_slice(batch, 0, 4), False) / 4).backward()
    assert torch.allclose(grads([1.0, 0.0, 0.0, 0.0]), flat(stock.model), atol=1e-7)


def test_shared_prompt_gives_the_stock_loss_and_gradient_with_fewer_tokens(make) -> None:
    def run(share: bool, checkpointing: bool = False) -> tuple[float, torch.Tensor, int]:
        trainer, batch = make([1.0, 0.5, 2.0, 0.0], share_prompt=share)
        if checkpointing:  # no key/value cache in checkpointed layers: the stock forward runs
            trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
        seen = []
        hook = trainer.model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: seen.append(args[0].numel())
        )
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        hook.remove()
        grad = torch.cat(
            [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
        )
        return loss.item(), grad, sum(seen)

    shared_loss, shared_grad, shared_tokens = run(True)
    plain_loss, plain_grad, plain_tokens = run(False)
    assert shared_loss == pytest.approx(plain_loss, abs=1e-6)
    assert torch.allclose(shared_grad, plain_grad, atol=1e-6)
    assert shared_tokens < 0.75 * plain_tokens  # each prompt ran once, padding trimmed
    checkpointed_loss, _, checkpointed_tokens = run(True, checkpointing=True)
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-6)
    assert checkpointed_tokens > shared_tokens


def test_missing_weight_column_is_an_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = WeightedDPOConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, weight_column="score_gap"
    )
    with pytest.raises(ValueError, match="no 'score_gap' column"):
        WeightedDPOTrainer(
            model=model, args=args, train_dataset=dataset([1.0] * 4), processing_class=tokenizer
        )
