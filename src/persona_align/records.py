"""The record types, the only contract between pipeline stages, and their file formats.

Every stage reads and writes these records as JSONL (one object per line) or Parquet.
Validation is strict (unknown keys are rejected) so that a typo in a hand-written file is
reported with its line and field instead of being silently dropped. Writes are atomic: a
crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any, Literal, TypeVar, get_origin

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from persona_align.errors import InputError
from persona_align.files import require_file

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank")
    return value


Text = Annotated[str, AfterValidator(_non_blank)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Turn(_Record):
    """One utterance of the dialogue history."""

    speaker: NonEmptyStr
    text: Text


PersonaRole = Literal["user", "self"]
PERSONA_ROLES: tuple[str, ...] = ("user", "self")


class Dialogue(_Record):
    """A persona-grounded dialogue up to the turn a model must answer.

    ``persona`` holds the sentences the reply should be consistent with; ``persona_role`` says
    whose they are: ``user``, the person the model talks to (FoCus), or ``self``, the model's
    own (PERSONA-CHAT, ConvAI2, Blended Skill Talk, DuLeMon). Absent means ``user``, so files
    written before the field existed keep their meaning. ``reference`` is the gold next turn
    when the dataset has one. ``persona_grounding`` (FoCus, DuLeMon) marks which persona
    sentences the gold turn uses; PAL's persona-selection task trains on it.
    """

    id: NonEmptyStr
    persona: list[Text] = Field(min_length=1)
    persona_role: PersonaRole = "user"
    context: list[Turn] = Field(min_length=1)
    reference: str | None = None
    knowledge: list[str] | None = None
    source: str = ""
    persona_grounding: list[bool] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Dialogue:
        if self.persona_grounding is not None and len(self.persona_grounding) != len(self.persona):
            raise ValueError(
                f"persona_grounding has {len(self.persona_grounding)} labels "
                f"for {len(self.persona)} persona sentences"
            )
        return self


class Candidate(_Record):
    """One responder's reply to one dialogue; ``response`` is None when none could be extracted."""

    dialogue_id: NonEmptyStr
    responder: NonEmptyStr
    raw: str
    response: str | None
    valid: bool
    latency_s: float | None = Field(default=None, ge=0)
    prompt_hash: str = ""
    error: str | None = None

    @model_validator(mode="after")
    def _validity_matches_response(self) -> Candidate:
        if self.valid != (self.response is not None):
            raise ValueError("valid must be true exactly when response is not null")
        return self


class ScoredCandidate(Candidate):
    """A candidate with its metric values; ``None`` means the metric could not be computed."""

    scores: dict[str, float | None] = Field(default_factory=dict)
    total: float | None = None


class Message(_Record):
    role: Literal["system", "user", "assistant"]
    content: str


class PreferencePair(_Record):
    """A DPO pair in TRL's conversational preference format plus the scores that made it."""

    dialogue_id: NonEmptyStr
    prompt: list[Message] = Field(min_length=1)
    chosen: list[Message] = Field(min_length=1)
    rejected: list[Message] = Field(min_length=1)
    score_chosen: float
    score_rejected: float
    weight: float = Field(default=1.0, ge=0)
    rule: NonEmptyStr


class SFTExample(_Record):
    """A supervised example in TRL's conversational prompt-completion format.

    ``task`` names what the example teaches (PAL's ``select``/``generate-persona``/
    ``generate-plain``, SBS's ``score-conditioned``), so mixtures can be counted and resampled.
    """

    dialogue_id: NonEmptyStr
    prompt: list[Message] = Field(min_length=1)
    completion: list[Message] = Field(min_length=1)
    task: NonEmptyStr
    meta: dict[str, Any] = Field(default_factory=dict)


class JudgeInput(BaseModel):
    """What a judge reads: a reply with its persona and context (unlabelled replies, e.g. for
    distillation). ``persona`` is the sentences glued together as the datasets write them, or a
    list; ``context`` is ``User1: ...`` lines. Other keys (ids, provenance, notes) are kept but
    not checked."""

    model_config = ConfigDict(extra="allow")

    persona: Text | list[Text]
    persona_role: PersonaRole = "user"
    context: str
    reply: Text


class JudgeItem(JudgeInput):
    """A reply labelled by a careful reader: the format of the persona-consistency dev set.

    ``label`` is 1 (uses the persona consistently), 0 (neutral) or -1 (contradicts it) for
    the C judge, 1 (coherent) or 0 for the coherence judge.
    """

    label: Literal[-1, 0, 1]


Record = TypeVar("Record", bound=BaseModel)

RECORD_TYPES: dict[str, type[BaseModel]] = {
    "dialogue": Dialogue,
    "candidate": Candidate,
    "scored": ScoredCandidate,
    "pair": PreferencePair,
    "sft": SFTExample,
}


def _field_of(err: ValidationError) -> tuple[str | None, str]:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":  # name the value given, beside the allowed ones
        msg += f", got {first['input']!r}"
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return loc, msg


def validate_record(model: type[Record], data: Any, path: str | Path, where: str) -> Record:
    """Validate one decoded object, turning pydantic's report into a one-line InputError."""
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}", where=where)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        field, msg = _field_of(err)
        raise InputError(path, msg, where=where, field=field) from None


# --- atomic writes -------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


_TEMP_NAME = r"\.{name}\.[a-z0-9_]{{8}}\.tmp"  # what atomic_path's mkstemp names look like


def _remove_stale_temps(target: Path) -> None:
    """Remove the temporary files of ``target`` that a killed writer left behind.

    A live writer holds a lock on its temporary file until it is renamed; the kernel drops the
    lock when the writer dies, however it dies. So an unlocked one is a leftover, and a locked
    one (another process writing the same output) is left alone.
    """
    pattern = re.compile(_TEMP_NAME.format(name=re.escape(target.name)))
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if not pattern.fullmatch(leftover.name):
            continue
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            leftover.unlink(missing_ok=True)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)


def _locked_temp(target: Path) -> tuple[int, Path]:
    """A new temporary file beside ``target``, locked; a place that cannot hold it is bad input."""
    if target.is_dir():
        raise InputError(target, "is a directory, expected a file to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:  # not removed as a leftover before we locked it
                break
            os.close(fd)
    except OSError as err:
        raise InputError(target, f"cannot be written: {err.strerror}") from None
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Leftovers of a killed earlier writer of ``path`` are removed first, so a crash followed by a
    rerun leaves no temporary file behind.
    """
    target = Path(path)
    _remove_stale_temps(target)
    fd, tmp_path = _locked_temp(target)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that becomes ``path`` when the block succeeds."""
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


# --- JSONL ---------------------------------------------------------------------------------


def iter_jsonl(path: str | Path, model: type[Record]) -> Iterator[Record]:
    """Yield validated records from a JSONL file; blank lines are skipped."""
    path = require_file(path)
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    path, f"not valid UTF-8 (byte 0x{raw[err.start]:02x})", where=where
                ) from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(
                    path, f"malformed JSON: {err.msg} (column {err.colno})", where=where
                ) from None
            yield validate_record(model, data, path, where)


def read_jsonl(path: str | Path, model: type[Record]) -> list[Record]:
    return list(iter_jsonl(path, model))


def _dump_line(record: BaseModel) -> str:
    return json.dumps(record.model_dump(mode="json"), ensure_ascii=False, allow_nan=False)


def write_jsonl(path: str | Path, records: Iterable[BaseModel]) -> int:
    """Write records atomically, one JSON object per line; returns how many were written."""
    count = 0
    with atomic_open(path) as handle:
        for record in records:
            handle.write(_dump_line(record) + "\n")
            count += 1
    return count


# --- Parquet -------------------------------------------------------------------------------

_JSON_COLUMNS_KEY = b"persona_align.json_columns"


def _json_columns(model: type[BaseModel]) -> list[str]:
    """Free-form dict fields are stored as JSON text: Parquet structs would invent missing keys."""
    return [name for name, f in model.model_fields.items() if get_origin(f.annotation) is dict]


def write_parquet(path: str | Path, records: Iterable[BaseModel], model: type[BaseModel]) -> int:
    json_cols = _json_columns(model)
    rows = []
    for record in records:
        row = record.model_dump(mode="json")
        for col in json_cols:
            row[col] = json.dumps(row[col], ensure_ascii=False, allow_nan=False)
        rows.append(row)
    if rows:
        table = pa.Table.from_pylist(rows)
    else:
        table = pa.table({name: pa.array([], pa.null()) for name in model.model_fields})
    table = table.replace_schema_metadata({_JSON_COLUMNS_KEY: ",".join(json_cols).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return len(rows)


def read_parquet(path: str | Path, model: type[Record]) -> list[Record]:
    path = require_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(path, f"not a readable Parquet file ({err})") from None
    meta = table.schema.metadata or {}
    json_cols = [c for c in meta.get(_JSON_COLUMNS_KEY, b"").decode().split(",") if c]
    out = []
    for index, row in enumerate(table.to_pylist(), start=1):
        row = {k: v for k, v in row.items() if not (v is None and k in json_cols)}
        for col in json_cols:
            if col in row:
                row[col] = json.loads(row[col])
        out.append(validate_record(model, row, path, f"row {index}"))
    return out


# --- format by suffix ----------------------------------------------------------------------


def _is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() in {".parquet", ".pq"}


def read_records(path: str | Path, model: type[Record]) -> list[Record]:
    """Read JSONL or Parquet (chosen by the file suffix) into validated records."""
    return read_parquet(path, model) if _is_parquet(path) else read_jsonl(path, model)


def write_records(path: str | Path, records: Iterable[BaseModel], model: type[BaseModel]) -> int:
    """Write JSONL or Parquet (chosen by the file suffix) atomically."""
    if _is_parquet(path):
        return write_parquet(path, records, model)
    return write_jsonl(path, records)
