"""The device policy: one setting decides where every model loads (devices.py).

GPU placement itself is checked by tests/test_gpu.py on a CUDA machine; here: the policy's
choices, its errors, that an explicit ``--device cpu`` is honoured, and that every model load
goes through it (at run time for each kind of model, and by reading the source for new loads).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from persona_align import devices
from persona_align.errors import InputError

SRC = Path(__file__).resolve().parents[1] / "src" / "persona_align"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_auto_picks_the_best_device_and_fp32_off_gpus() -> None:
    expected = "cuda" if torch.cuda.is_available() else None
    chosen = devices.current()
    assert chosen == (expected or ("mps" if devices._mps_available() else "cpu"))
    if chosen == "cpu":
        assert devices.default_dtype() == "float32"
        assert devices.dtype_for("auto") == "float32"
    assert devices.dtype_for("bfloat16") == "bfloat16"


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_a_missing_device_is_refused(name: str) -> None:
    with pytest.raises(InputError, match="CUDA is not available on this machine"):
        devices.configure(name)


@pytest.mark.parametrize("name", ["gpu", "cpu:1", "cuda:x", ""])
def test_an_unknown_device_names_the_allowed_ones(name: str) -> None:
    with pytest.raises(InputError, match="auto, cpu, cuda, mps or cuda:N"):
        devices.check_device(name)


def test_flash_attention_without_flash_attn_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="flash-attn is not installed"):
        devices.configure(attn_implementation="flash_attention_2")
    with pytest.raises(InputError, match="sdpa, eager, flash_attention_2"):
        devices.configure(attn_implementation="fast")
    devices.configure(attn_implementation="eager")
    assert devices.load_kwargs() == {"attn_implementation": "eager"}
    devices.configure(attn_implementation="sdpa")
    assert devices.load_kwargs() == {}  # transformers' own default: sdpa where supported


@no_cuda
def test_cli_device_cuda_exits_2(cli, tmp_path: Path) -> None:
    result = cli("--device", "cuda", "data", "validate", tmp_path / "x.jsonl")
    assert result.code == 2
    assert result.err.strip() == "error: device cuda: CUDA is not available on this machine"


@no_cuda
def test_a_config_device_this_machine_lacks_names_file_and_field(tmp_path: Path) -> None:
    from persona_align.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("device: cuda\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: field 'device': device cuda: CUDA is not available on this machine"
    )


def test_the_command_line_device_wins_over_the_config(tmp_path: Path) -> None:
    from persona_align.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("device: cuda\n")  # written for a GPU machine
    devices.configure("cpu", explicit=True)
    load_config(path)  # no error: the config's device is not used
    assert devices.current() == "cpu"
    path.write_text("device: cpu\nattn_implementation: eager\n")
    devices.reset()
    load_config(path)
    assert (devices.current(), devices.attention()) == ("cpu", "eager")


def _model_loads(tree: ast.AST) -> list[ast.Call]:
    """Calls that build a model: AutoModel*.from_pretrained / from_config, SentenceTransformer(),
    BERTScorer()."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in ("from_pretrained", "from_config")
            and isinstance(func.value, ast.Name)
            and func.value.id.startswith("AutoModel")
        ) or (isinstance(func, ast.Name) and func.id in ("SentenceTransformer", "BERTScorer")):
            found.append(node)
    return found


def _uses_policy(function: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "devices"
        for node in ast.walk(function)
    )


# Loads that are not for running: the GGUF checkpoint is converted once on the CPU and written.
NOT_RUN = {("models.py", "_convert_gguf")}


def test_every_model_load_in_the_source_goes_through_the_policy() -> None:
    bypass, loads = [], 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            inner = [n for n in ast.walk(function) if n is not function]
            nested = {id(c) for f in inner if isinstance(f, ast.FunctionDef)
                      for c in _model_loads(f)}  # fmt: skip
            calls = [c for c in _model_loads(function) if id(c) not in nested]
            loads += len(calls)
            if calls and (path.name, function.name) not in NOT_RUN and not _uses_policy(function):
                bypass.append(f"{path.relative_to(SRC)}:{calls[0].lineno} in {function.name}")
    assert loads >= 10  # the scan finds the loads (a rename would otherwise pass silently)
    assert not bypass, f"model loads that bypass devices: {bypass}"


def test_each_kind_of_model_is_placed_by_the_policy(
    tiny_llama_dir: Path, tmp_path: Path, make_classifier
) -> None:
    """Explicit ``cpu``: every kind of model we load records its placement and sits there."""
    from persona_align.metrics.coherence_judge import CoherenceJudge
    from persona_align.metrics.nli import NLIModel, PairClassifier, embedded_dir
    from persona_align.metrics.persona_distance import PersonaDistance
    from persona_align.models import load_causal_lm

    devices.configure("cpu", explicit=True)
    devices.placed.clear()
    model, _ = load_causal_lm(str(tiny_llama_dir))
    nli = NLIModel("embedded-nli")
    nli.load()
    judge = PairClassifier("embedded-c-judge")
    judge.load()
    coherence = CoherenceJudge(embedded_dir("embedded-coh-judge"))
    coherence.load()
    p_static = PersonaDistance(backend="static")
    p_static.load()
    kinds = [what for what, _ in devices.placed]
    assert kinds == ["causal lm", "NLI", "pair-classifier", "coherence encoder", "P encoder"]
    assert {where for _, where in devices.placed} == {"cpu"}
    for loaded in (model, nli.model, judge.model, coherence._encoder, p_static._encoder):
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_a_training_run_records_its_device_and_effective_batch(
    tmp_path: Path, tiny_llama_dir: Path, pairs_file
) -> None:
    from persona_align.config import TrainConfig
    from persona_align.training.dpo import train_dpo

    pairs = pairs_file([1.0] * 4)
    devices.configure("cpu", explicit=True)
    summary = train_dpo(
        TrainConfig(
            model=str(tiny_llama_dir), data=pairs, output_dir=tmp_path / "run", max_steps=1,
            batch_size=1, grad_accum=2, save_steps=5,
        )
    )  # fmt: skip
    assert summary["device"] == "cpu" and summary["effective_batch"] == 2
    assert summary["precision"] == "fp32"


def test_share_prompt_and_checkpointing_together_are_refused() -> None:
    from persona_align.config import TrainConfig
    from persona_align.training.common import memory_settings

    both = TrainConfig(share_prompt=True, gradient_checkpointing=True)
    with pytest.raises(InputError, match="share_prompt needs the key/value cache"):
        memory_settings(both)
    assert memory_settings(TrainConfig(gradient_checkpointing=True)) == (True, False)
    assert memory_settings(TrainConfig(share_prompt=True)) == (False, True)
    default_checkpointing = devices.current().startswith("cuda")
    assert memory_settings(TrainConfig()) == (default_checkpointing, not default_checkpointing)


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse_and_name_valid_settings(path: Path) -> None:
    """Multi-GPU runs go through ``accelerate launch --config_file``: accelerate itself reads
    each file (unknown keys are refused) and every DeepSpeed key is a launch option."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    assert config.distributed_type in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED)
    assert config.num_processes >= 2 and not config.use_cpu
    assert str(config.mixed_precision) == "bf16"  # what the GPU trainer defaults use
    options = {action.dest for action in launch_command_parser()._actions}
    unknown = set(config.deepspeed_config or {}) - options
    assert not unknown, f"not accelerate launch options: {unknown}"
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] in (2, 3)


def test_the_accelerate_config_check_can_fail(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "ddp.yaml").read_text() + "bogus_key: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))
