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


@pytest.fixture(scope="module")
def trained(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model's weights after a few stock DPO steps at a high learning rate.

    At the initial policy every pair's loss is log 2 (policy = reference), so a weight applied
    to the wrong pair would change nothing; after these steps the pairs' losses differ.
    """
    torch.manual_seed(0)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("steps")), report_to=[],
                     per_device_train_batch_size=2, max_steps=4, learning_rate=3e-2, beta=0.1,
                     use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        args=args,
        train_dataset=dataset([1.0] * 4).remove_columns("weight"),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture
def make(tiny_llama_dir: Path, tmp_path: Path, trained: dict):
    """A trainer (ours or stock) whose policy is the trained model and whose reference is the
    initial one, and one collated batch of the four pairs."""

    def build(weights: list[float], stock: bool = False, share_prompt: bool = True, **options: str):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model.load_state_dict(trained)
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        common = {"output_dir": str(tmp_path / ("stock" if stock else "weighted")), "report_to": [],
                  "per_device_train_batch_size": 4, "beta": 0.1, "use_cpu": True,
                  "activation_checkpointing": False}  # fmt: skip
        if stock:
            trainer = DPOTrainer(
                model=model,
                ref_model=reference,
                args=DPOConfig(**common),
                train_dataset=dataset(weights).remove_columns("weight"),
                processing_class=tokenizer,
            )
        else:
            trainer = WeightedDPOTrainer(
                model=model,
                ref_model=reference,
                args=WeightedDPOConfig(**common, share_prompt=share_prompt, **options),
                train_dataset=dataset(weights),
                processing_class=tokenizer,
            )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        return trainer, batch

    return build


def stock_pair_losses(make) -> list[torch.Tensor]:
    stock, batch = make([1.0] * 4, stock=True)
    return [stock._compute_loss(stock.model, _pair_slice(batch, i, 4), False) for i in range(4)]


FORWARDS = pytest.mark.parametrize("share", [True, False], ids=["prompt-once", "batch-once"])


@FORWARDS
def test_weighted_loss_is_weighted_mean_of_stock_pair_losses(make, share: bool) -> None:
    weights = [1.0, 0.0, 0.5, 2.0]
    trainer, batch = make(weights, share_prompt=share)
    assert batch[WEIGHT_KEY].tolist() == weights
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    per_pair = [loss_i.item() for loss_i in stock_pair_losses(make)]
    assert max(per_pair) - min(per_pair) > 0.05  # the pairs' losses differ: the weights matter

    def weighted_mean(ws: list[float]) -> float:
        return sum(w * loss_i for w, loss_i in zip(ws, per_pair, strict=True)) / 4

    assert loss == pytest.approx(weighted_mean(weights), rel=1e-5)
    for shift in (1, 2, 3):  # the same weights on the wrong pairs give another loss
        assert loss != pytest.approx(weighted_mean(weights[shift:] + weights[:shift]), rel=1e-3)


def test_mean_normalised_weights_keep_their_shape_at_mean_one(make) -> None:
    weights = [1.0, 0.0, 0.5, 2.0]  # mean 0.875
    _, batch = make(weights, weight_norm="mean")
    assert batch[WEIGHT_KEY].tolist() == pytest.approx([w / 0.875 for w in weights])
    _, plain = make(weights)
    assert plain[WEIGHT_KEY].tolist() == weights


def test_all_ones_reproduce_the_stock_trainer(make) -> None:
    trainer, batch = make([1.0] * 4)
    stock, stock_batch = make([1.0] * 4, stock=True)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    theirs = stock.compute_loss(stock.model, dict(stock_batch))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


@FORWARDS
def test_zero_weight_pair_contributes_no_gradient(make, share: bool) -> None:
    def flat(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def grads(weights: list[float]) -> torch.Tensor:
        trainer, batch = make(weights, share_prompt=share)
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        return flat(trainer.model)

    assert torch.count_nonzero(grads([0.0] * 4)) == 0
    # only pair 0 weighted: the gradient is pair 0's stock gradient / 4, whatever pairs 1-3 hold
    stock, batch = make([1.0] * 4, stock=True)
    (stock._compute_loss(stock.model, _pair_slice(batch, 0, 4), False) / 4).backward()
    assert torch.allclose(grads([1.0, 0.0, 0.0, 0.0]), flat(stock.model), atol=1e-7)


def test_without_share_prompt_the_batch_runs_through_the_model_once(make) -> None:
    trainer, batch = make([1.0, 0.5, 2.0, 0.0], share_prompt=False)
    calls = []
    hook = trainer.model.register_forward_hook(lambda module, args, out: calls.append(1))
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    hook.remove()
    assert len(calls) == 1


def test_shared_prompt_gives_the_stock_loss_and_gradient_with_fewer_tokens(make) -> None:
    def run(share: bool, checkpointing: bool = False) -> tuple[float, torch.Tensor, int]:
        trainer, batch = make([1.0, 0.5, 2.0, 0.0], share_prompt=share)
        if checkpointing:  # no key/value cache in checkpointed layers: refused, not ignored
            trainer.model.activation_checkpointing_enable({"use_reentrant": False})
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
    with pytest.raises(ValueError, match="share_prompt needs the key/value cache"):
        run(True, checkpointing=True)
    checkpointed_loss, _, _ = run(False, checkpointing=True)
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-6)


def test_share_prompt_follows_checkpointing_unless_both_are_asked_for(tmp_path: Path) -> None:
    def config(**options: bool) -> WeightedDPOConfig:
        return WeightedDPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **options)

    assert config(activation_checkpointing=True).share_prompt is False
    assert config(activation_checkpointing=False).share_prompt is True
    with pytest.raises(ValueError, match="share_prompt needs the key/value cache"):
        config(activation_checkpointing=True, share_prompt=True)


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
