"""The pipeline config: YAML on disk, validated by pydantic, one section per stage.

Unknown keys and wrong types are rejected with the path of the offending key, so a typo in a
config never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)

from persona_align import devices
from persona_align.data import reader_for
from persona_align.errors import InputError
from persona_align.files import require_file
from persona_align.preference.pairs import PairFormat, PairWeight
from persona_align.preference.pal import PALDataConfig
from persona_align.preference.sbs.dataset import SBSConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _known_format(name: str) -> str:
    try:
        reader_for(name)
    except InputError as err:
        raise ValueError(err.message) from None
    return name


# A dataset format `data import` reads: an unknown one fails when the config loads.
ReaderFormat = Annotated[str, AfterValidator(_known_format)]


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
    """``dialogues``, ``output``: set by ``persona-align run``; ``generate --config`` needs both."""

    dialogues: Path | None = None
    output: Path | None = None
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
    """One training run. ``None`` means "the default for this device" (see training.common);
    the effective batch (``batch_size`` x ``grad_accum``) is the same on every device."""

    method: Literal["dpo", "sft"] = "dpo"
    model: str = "embedded"
    data: Path | None = None  # set by `persona-align run` from the pairs stage
    output_dir: Path | None = None  # likewise: the run's train/ folder
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    weighting: str = Field(
        "column:weight",
        description="dpo: the pairs file's weight column (default: what `pairs` wrote), "
        "'sigmoid' to recompute sigmoid(score_chosen - score_rejected), 'one' (vanilla DPO), "
        "or 'column:NAME' for any numeric column of the pairs file",
    )
    weight_norm: Literal["none", "mean"] = Field(
        "none",
        description="dpo: 'mean' scales the weights to mean 1 over the pairs trained on, so "
        "weighting changes how the pairs share the loss, not the step size",
    )
    beta: float = Field(0.1, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(2, ge=1)  # per device; raise it and lower grad_accum on a GPU
    grad_accum: int = Field(8, ge=1)  # 2 x 8: an effective batch of 16 pairs
    warmup_steps: int = Field(0, ge=0)
    max_length: int = Field(1024, ge=8)
    precompute_ref: bool = True
    # DPO: a pair's prompt runs once for both replies; it needs the key/value cache, which
    # activation checkpointing turns off. None: on unless checkpointing is.
    share_prompt: bool | None = None
    gradient_checkpointing: bool | None = None  # None: on for GPUs unless share_prompt is set
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    save: Literal["adapter", "merged"] = "adapter"
    seed: int = 0


# A method (PAL, SBS) trains several stages in one run folder: each stage gets a trainer section
# without what the method sets itself (method, base model, data file, run folder).
_STAGE_SET = ("method", "model", "data", "output_dir")
TrainerSettings = create_model(
    "TrainerSettings",
    __base__=_Section,
    __doc__="A trainer stage of a method: TrainConfig minus " + ", ".join(_STAGE_SET) + ".",
    **{n: (f.annotation, f) for n, f in TrainConfig.model_fields.items() if n not in _STAGE_SET},
)


class DecodeSection(_Section):
    """Decoding of a method's own generation (PAL's rejected replies, evaluation replies)."""

    max_new_tokens: int = Field(110, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class MethodEvalSection(_Section):
    """Held-out dialogues the trained model answers after training."""

    dialogues: Path
    format: ReaderFormat = "jsonl"
    max_dialogues: int | None = Field(None, ge=1)
    decode: DecodeSection = Field(default_factory=DecodeSection)


class PALEvalSection(MethodEvalSection):
    selection: Literal["predicted", "gold"] = "predicted"  # gold = the released code's oracle
    threshold: float = Field(0.5, ge=0, le=1)  # word-overlap F1 to map pass 1 to a sentence


class SBSEvalSection(MethodEvalSection):
    score: float = 1.0  # the score asked for at inference (SBS: the top one)


class _MethodSection(_Section):
    model: str = "embedded"
    dialogues: Path
    format: ReaderFormat = "jsonl"
    max_dialogues: int | None = Field(None, ge=1)
    output_dir: Path


class PALConfig(_MethodSection):
    """``persona-align train pal``: labels, stage-1 SFT, stage-1 replies, pairs, stage-2 DPO."""

    nli: str = "embedded-nli"  # labels dialogues without persona_grounding
    data: PALDataConfig = Field(default_factory=PALDataConfig)
    stage1: TrainerSettings = Field(default_factory=TrainerSettings)  # type: ignore[valid-type]
    rejected: DecodeSection = Field(default_factory=DecodeSection)
    stage2: TrainerSettings = Field(  # type: ignore[valid-type]
        default_factory=lambda: TrainerSettings(weighting="one")
    )
    evaluate: PALEvalSection | None = None

    @field_validator("stage2", mode="before")
    @classmethod
    def _unweighted(cls, value: Any) -> Any:
        """PAL's DPO is unweighted (its pairs score 1/0): weighting defaults to one here."""
        return {"weighting": "one", **value} if isinstance(value, dict) else value


class SBSSection(_MethodSection):
    """``persona-align train sbs``: score-conditioned SFT data, then SFT."""

    data: SBSConfig = Field(default_factory=SBSConfig)
    train: TrainerSettings = Field(default_factory=TrainerSettings)  # type: ignore[valid-type]
    evaluate: SBSEvalSection | None = None


class DataSection(_Section):
    """Dialogues for a run: ``train`` feeds generation, ``eval`` the evaluation.

    A path, or ``sample:train`` / ``sample:valid`` for the bundled sample dialogues.
    """

    format: ReaderFormat = "jsonl"
    train: str
    eval: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)

    @field_validator("options")
    @classmethod
    def _options_of_format(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "format" in info.data:  # else the format itself was refused
            try:
                reader_for(info.data["format"], options)
            except InputError as err:
                raise ValueError(err.message) from None
        return options


class ScoreSection(_Section):
    metrics: list[str] = Field(default_factory=lambda: ["coh", "c", "ue", "p", "lfc"], min_length=1)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    use_cache: bool = True


class PairsSection(_Section):
    rule: Literal["quantile", "margin", "best-worst", "format"] = "quantile"
    upper: float = Field(0.6, ge=0, le=1)
    lower: float = Field(0.4, ge=0, le=1)
    margin: float = Field(0.1, ge=0)
    max_pairs_per_dialogue: int | None = Field(None, ge=1)
    weights: dict[str, float] | None = None  # None: PersoDPO's weights
    weight: PairWeight = "sigmoid"
    response_format: PairFormat = "auto"
    seed: int = 0


class EvaluateSection(_Section):
    """Systems answering ``data.eval``: the base and trained models, plus any responders."""

    base: bool = True
    trained: bool = True
    responders: list[ResponderConfig] = Field(default_factory=list)
    params: ParamsConfig = Field(default_factory=ParamsConfig)
    metrics: list[str] | None = None  # None: the score section's metrics
    batch_size: int = Field(8, ge=1)


class ReportSection(_Section):
    baseline: str | None = "base"
    title: str | None = None
    n_boot: int = Field(1000, ge=100)


STAGES = ("data", "generate", "score", "pairs", "train", "evaluate", "report")


class PipelineConfig(_Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # where every model of the run loads (devices.py); --device on the command line wins
    device: str | None = None
    attn_implementation: str | None = None
    output_dir: Path | None = None  # default: runs/<name>
    seed: int = 0
    data: DataSection | None = None
    generate: GenerateConfig | None = None
    score: ScoreSection | None = None
    pairs: PairsSection | None = None
    train: TrainConfig | None = None
    evaluate: EvaluateSection | None = None
    report: ReportSection | None = None
    pal: PALConfig | None = None
    sbs: SBSSection | None = None


def load_config(path: str | Path) -> PipelineConfig:
    path = require_file(path)
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
        raise InputError(path, first["msg"].removeprefix("Value error, "), field=field) from None
    base = path.parent
    if config.generate is not None:  # paths in a config are relative to the config file
        g = config.generate
        g.dialogues = base / g.dialogues if g.dialogues is not None else None
        g.output = base / g.output if g.output is not None else None
        if g.cache is not None:
            g.cache = base / g.cache
    if config.train is not None:
        t = config.train
        t.data = base / t.data if t.data is not None else None
        t.output_dir = base / t.output_dir if t.output_dir is not None else None
        if t.model.startswith(("./", "../", "/")) or (base / t.model).is_dir():
            t.model = str(base / t.model)
    for section in (config.generate, config.evaluate):
        for responder in getattr(section, "responders", None) or []:
            extra = responder.model_extra or {}
            if isinstance(extra.get("path"), str):  # an imported responses file
                extra["path"] = _relative(base, extra["path"])
    if config.data is not None:
        d = config.data
        d.train = _relative(base, d.train)
        d.eval = _relative(base, d.eval) if d.eval is not None else None
    if config.output_dir is not None:
        config.output_dir = base / config.output_dir
    for m in (config.pal, config.sbs):
        if m is not None:
            m.dialogues, m.output_dir = base / m.dialogues, base / m.output_dir
            if m.model.startswith(("./", "../", "/")) or (base / m.model).is_dir():
                m.model = str(base / m.model)
            if m.evaluate is not None:
                m.evaluate.dialogues = base / m.evaluate.dialogues
    _apply_device_policy(path, config)
    return config


def _apply_device_policy(path: Path, config: PipelineConfig) -> None:
    """The config's ``device`` / ``attn_implementation`` become the process's policy (a
    command-line ``--device`` keeps precedence); a device this machine lacks is exit 2."""
    for key in ("device", "attn_implementation"):
        value = getattr(config, key)
        if value is None:
            continue
        try:
            devices.configure(**{key: value})
        except InputError as err:
            raise InputError(path, err.message, field=key) from None


def _relative(base: Path, location: str) -> str:
    """A data location relative to the config file; ``sample:`` names stay as they are."""
    return location if location.startswith("sample:") else str(base / location)
