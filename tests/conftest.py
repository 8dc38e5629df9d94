from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from persona_align.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"{SHARED_DATA} is absent")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _device_policy() -> Iterator[None]:
    """Every test starts from the default policy (auto) and leaves none behind."""
    from persona_align import devices

    devices.reset()
    yield
    devices.reset()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2 tokenizer, converted from its GGUF once per test session."""
    import os

    from persona_align import models

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("PERSONA_ALIGN_CACHE")
    os.environ["PERSONA_ALIGN_CACHE"] = str(cache)
    try:
        tokenizer = models.load_tokenizer("embedded")
    finally:
        if old is None:
            del os.environ["PERSONA_ALIGN_CACHE"]
        else:
            os.environ["PERSONA_ALIGN_CACHE"] = old
    folder = cache / "smollm2-135m-instruct" / "tokenizer"
    assert (folder / ".complete").exists()
    assert tokenizer.chat_template
    return folder


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The embedded all-MiniLM-L6-v2 tokenizer (WordPiece), for tiny BERT models."""
    from transformers import AutoTokenizer

    from persona_align.models import resolve

    return AutoTokenizer.from_pretrained(resolve("embedded-minilm").location)


@pytest.fixture(scope="session")
def make_classifier(minilm_tokenizer):
    """``make(folder, id2label, winner=None, judge=None)``: a random 2-layer BERT pair
    classifier saved to ``folder``; with ``winner`` its bias makes that output always win;
    ``judge`` is written as the folder's judge.json."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    def make(
        folder: Path, id2label: dict[int, str], winner: int | None = None,
        judge: dict | None = None,
    ) -> Path:  # fmt: skip
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(minilm_tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
            num_labels=len(id2label), id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
        )  # fmt: skip
        model = BertForSequenceClassification(config)
        if winner is not None:
            with torch.no_grad():
                model.classifier.weight.zero_()
                model.classifier.bias.zero_()
                model.classifier.bias[winner] = 5.0
        model.save_pretrained(folder)
        minilm_tokenizer.save_pretrained(folder)
        if judge is not None:
            (folder / "judge.json").write_text(json.dumps(judge))
        return folder

    return make


def _tiny_llama(folder: Path, tokenizer_dir: Path, **config: object) -> Path:
    """Save a 2-layer random Llama with the SmolLM2 tokenizer to ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    LlamaForCausalLM(LlamaConfig(**(settings | config))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local checkpoint directory."""
    return _tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir, tie_word_embeddings=True
    )


@pytest.fixture(scope="session")
def lively_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama whose greedy replies vary from step to step (untied embeddings and
    larger initial weights; ``tiny_llama_dir`` repeats the prompt's last token forever)."""
    return _tiny_llama(
        tmp_path_factory.mktemp("lively-llama"),
        smollm2_tokenizer_dir,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def summary(self) -> dict:
        return json.loads(self.out.strip().splitlines()[-1])


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: str) -> CliResult:
        capsys.readouterr()  # what fixtures printed (e.g. save progress bars) is not the command's
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder in which no file can be created, root included: immutable (``chattr +i``) when
    the tests run as root, for whom permission bits mean nothing; mode 0555 otherwise."""
    import os
    import shutil
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    as_root = os.geteuid() == 0

    def flag(sign: str) -> bool:
        return (
            subprocess.run(["chattr", f"{sign}i", str(folder)], capture_output=True).returncode == 0
        )

    if as_root and not (shutil.which("chattr") and flag("+")):
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")
    if not as_root:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if as_root:
            flag("-")
        else:
            folder.chmod(0o755)


@pytest.fixture
def pairs_file(tmp_path: Path):
    """``pairs_file(weights)``: a DPO pairs file of len(weights) tiny pairs (chosen uses the
    persona, rejected is bare) in the test's folder."""

    def write(weights: list[float]) -> Path:
        return _write_pairs(tmp_path / "pairs.jsonl", weights)

    return write


def _write_pairs(path: Path, weights: list[float]) -> Path:
    rows = [
        {"dialogue_id": f"d{i}", "prompt": [{"role": "user", "content": f"Hi {i}"}],
         "chosen": [{"role": "assistant", "content": "I love cats."}],
         "rejected": [{"role": "assistant", "content": "No."}], "weight": weight,
         "score_chosen": 1.0, "score_rejected": 0.0, "rule": "test"}
        for i, weight in enumerate(weights)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
