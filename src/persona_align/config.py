"""The pipeline config: YAML on disk, validated by pydantic, one section per stage.

Unknown keys and wrong types are rejected with the path of the offending key, so a typo in a
config never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persona_align.errors import InputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamsConfig(_Section):
    max_new_tokens: int = Field(110, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    variant: Literal["vanilla", "cot"] = "vanilla"
    word_limit: int = Field(110, ge=1)
    system: str | None = None
    extraction: Literal["lenient", "strict"] = "lenient"


class ResponderConfig(BaseModel):
    """``kind`` picks the registry entry; every other key is that responder's own option."""

    model_config = ConfigDict(extra="allow")
    kind: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GenerateConfig(_Section):
    dialogues: Path
    output: Path
    responders: list[ResponderConfig] = Field(min_length=1)
    params: ParamsConfig = Field(default_factory=ParamsConfig)
    cache: Path | None = None
    use_cache: bool = True


class LoraConfigSection(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainConfig(_Section):
    """One training run. ``None`` means "the default for this device" (see training.common)."""

    method: Literal["dpo", "sft"] = "dpo"
    model: str = "embedded"
    data: Path
    output_dir: Path
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    weighting: str = Field(
        "sigmoid",
        description="dpo: 'sigmoid' of the score gap (PersoDPO), 'one' (vanilla DPO), "
        "or 'column:NAME' for any numeric column of the pairs file",
    )
    beta: float = Field(0.1, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int | None = Field(None, ge=1)
    grad_accum: int | None = Field(None, ge=1)
    warmup_steps: int = Field(0, ge=0)
    max_length: int = Field(1024, ge=8)
    precompute_ref: bool = True
    gradient_checkpointing: bool | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    save: Literal["adapter", "merged"] = "adapter"
    seed: int = 0


class PipelineConfig(_Section):
    generate: GenerateConfig | None = None
    train: TrainConfig | None = None


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise InputError(
            path, f"malformed YAML: {getattr(err, 'problem', err)}", where=where
        ) from None
    except UnicodeDecodeError:
        raise InputError(path, "not valid UTF-8") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping of stage sections at the top level")
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InputError(path, first["msg"], field=field) from None
    base = path.parent
    if config.generate is not None:  # paths in a config are relative to the config file
        g = config.generate
        g.dialogues, g.output = base / g.dialogues, base / g.output
        if g.cache is not None:
            g.cache = base / g.cache
    if config.train is not None:
        t = config.train
        t.data, t.output_dir = base / t.data, base / t.output_dir
        if t.model.startswith(("./", "../", "/")) or (base / t.model).is_dir():
            t.model = str(base / t.model)
    return config
