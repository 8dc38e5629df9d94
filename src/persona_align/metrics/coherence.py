"""Coherence of a reply with the dialogue history: our embedded judge (``coh``, the default),
UniEval's T5 evaluator and a chat-LLM judge.

The last two ask "Is this a coherent response given the dialogue history?" and score
p(Yes) / (p(Yes) + p(No)) at the first answer token, computed as sigmoid(logit_Yes - logit_No)
(the softmax normaliser cancels, and no probability underflows). Items are length-sorted into
padded batches with attention masks and written back in input order, so a value never depends
on the batch it was in: PersoBench's released UniEval scorer returned misaligned values after
the 8th item of a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from persona_align import devices
from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, Unavailable, register_metric
from persona_align.metrics.coherence_judge import CoherenceJudge, coherence_input
from persona_align.metrics.loading import first_line, pretrained_source
from persona_align.metrics.nli import EMBEDDED_CLASSIFIERS, embedded_dir
from persona_align.models import DTYPES, load_causal_lm, model_version, resolve, tree_digest
from persona_align.prompting import (
    MIN_SHARED_PREFIX,
    format_context,
    render_chat,
    shared_prefix,
)
from persona_align.records import Message, Turn

UNIEVAL_DIALOG = "MingZhong/unieval-dialog"
EMBEDDED_COH_JUDGE = "embedded-coh-judge"
UNIEVAL_QUESTION = "question: Is this a coherent response given the dialogue history?"
JUDGE_PROMPT = (
    "Dialogue history:\n{history}\n\n"
    "Response: {response}\n\n"
    "Is this a coherent response given the dialogue history? Answer Yes or No."
)


def _length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Item indices, shortest first, in batches: little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _check_batch_size(metric: str, batch_size: int) -> None:
    if batch_size < 1:
        raise InputError(
            None, f"metric {metric!r}: batch_size must be at least 1, got {batch_size}"
        )


def unieval_history(context: Sequence[Turn]) -> str:
    """UniEval's dialogue-history format: turn texts without speakers, "a \\n b \\n\\n".

    That is how UniEval's own examples and its Topical-Chat data write the ``source``; the
    model was trained on it. Whitespace inside a turn is collapsed so that a newline only ever
    separates turns.
    """
    return " \n ".join(" ".join(turn.text.split()) for turn in context) + " \n\n"


def unieval_input(response: str, context: Sequence[Turn]) -> str:
    """UniEval's coherence question (``add_question(dimension='coherence', task='dialogue')``)."""
    return (
        f"{UNIEVAL_QUESTION} </s> response: {response} </s> dialogue history: "
        f"{unieval_history(context)}"
    )


def _answer_ids(
    tokenizer: Any, yes: Sequence[str], no: Sequence[str]
) -> tuple[list[int], list[int]]:
    """First token ids of each spelling of Yes and of No; a token both share tells nothing."""

    def first_ids(words: Sequence[str]) -> set[int]:
        ids = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in words)
        return {i[0] for i in ids if i and i[0] != tokenizer.unk_token_id}

    yes_ids, no_ids = first_ids(yes), first_ids(no)
    yes_ids, no_ids = yes_ids - no_ids, no_ids - yes_ids
    if not yes_ids or not no_ids:
        raise Unavailable("the tokenizer has no distinct first token for Yes and No")
    return sorted(yes_ids), sorted(no_ids)


@register_metric("coh-unieval")
class CohUniEval(Metric):
    """UniEval's dialogue coherence (``MingZhong/unieval-dialog``, a T5 model), as PersoBench.

    The input is UniEval's, truncated on the right at ``max_length`` tokens like UniEval's
    scorer (so an over-long history loses its most recent turns). The answer is read at the
    first decoder step (the decoder start token), with UniEval's "Yes"/"No" token ids.
    """

    description = "UniEval dialogue coherence: p(Yes) of 'Is this a coherent response ...?'"
    failure_value = 0.0

    def __init__(
        self, model: str = UNIEVAL_DIALOG, batch_size: int = 16, max_length: int = 1024
    ) -> None:
        super().__init__()
        _check_batch_size(self.name, batch_size)
        self.model_name = model
        self.batch_size = batch_size
        self.max_length = max_length
        self._version: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._yes: list[int] = []
        self._no: list[int] = []

    @property
    def model(self) -> str:
        return self.model_name

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_name,
            "version": self._version,
            "max_length": self.max_length,
        }

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        location, local_only = pretrained_source(self.model_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
            model = AutoModelForSeq2SeqLM.from_pretrained(
                location, local_files_only=local_only, **devices.load_kwargs()
            )
        except (OSError, ValueError) as err:
            raise Unavailable(f"cannot load {self.model_name!r}: {first_line(err)}") from None
        if model.config.decoder_start_token_id is None:
            raise Unavailable(f"{self.model_name!r} has no decoder_start_token_id")
        tokenizer.padding_side = "right"
        self._yes, self._no = _answer_ids(tokenizer, ["Yes"], ["No"])
        self._model, self._tokenizer = devices.place(model, "unieval").eval(), tokenizer
        self._version = model_version(self.model_name)

    def inputs(self, items: Sequence[ScoreItem]) -> list[str]:
        """The exact texts given to the model, one per item."""
        return [unieval_input(item.response, item.dialogue.context) for item in items]

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        import torch

        self.load()
        model, tokenizer = self._model, self._tokenizer
        ids = tokenizer(self.inputs(items), truncation=True, max_length=self.max_length)
        ids = ids["input_ids"]
        values: list[float | None] = [None] * len(items)
        for batch in _length_batches([len(i) for i in ids], self.batch_size):
            enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            enc = enc.to(model.device)
            start = torch.full(
                (len(batch), 1), model.config.decoder_start_token_id, device=model.device
            )
            with torch.inference_mode():
                logits = model(**enc, decoder_input_ids=start).logits[:, 0, :].float()
            margin = logits[:, self._yes[0]] - logits[:, self._no[0]]
            for index, value in zip(batch, torch.sigmoid(margin).tolist(), strict=True):
                values[index] = value
        return values


def judge_prompt(response: str, context: Sequence[Turn]) -> str:
    """The coherence question for a chat model; the history keeps its speaker labels."""
    return JUDGE_PROMPT.format(history=format_context(context), response=response)


@register_metric("coh-smollm2")
class CohLLMJudge(Metric):
    """UniEval's coherence question asked of a chat LLM judge (default: embedded SmolLM2).

    The question goes through the model's chat template with the generation prompt; the score
    is read from the next-token distribution. Yes = the first tokens of "Yes" and " Yes"
    (after the assistant header a model may start either way), No likewise; their
    probabilities are summed (log-sum-exp of the logits). Runs offline, so it is the default
    coherence metric; its values are not comparable with UniEval's.
    """

    description = "coherence judged by a chat LLM: p(Yes) of 'Is this a coherent response ...?'"
    failure_value = 0.0

    def __init__(
        self,
        model: str = "embedded",
        dtype: str = "auto",
        batch_size: int = 8,
        share_prefix: bool = True,
    ) -> None:
        super().__init__()
        self.share_prefix = share_prefix
        if dtype not in DTYPES:
            raise InputError(
                None, f"metric {self.name!r}: dtype must be one of {', '.join(DTYPES)}"
            )
        _check_batch_size(self.name, batch_size)
        self.model_name = model
        self.dtype = dtype
        self.batch_size = batch_size
        self._version: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._yes: list[int] = []
        self._no: list[int] = []

    @property
    def model(self) -> str:
        return self.model_name

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_name,
            "version": self._version,
            "dtype": devices.dtype_for(self.dtype),
            "prompt": JUDGE_PROMPT,
        }

    def load(self) -> None:
        if self._model is not None:
            return
        pretrained_source(self.model_name)  # fail fast on an unreachable hub id
        try:
            model, tokenizer = load_causal_lm(self.model_name, self.dtype)
        except InputError as err:
            raise Unavailable(err.message) from None
        except (OSError, ValueError) as err:  # e.g. a folder that holds no causal LM
            raise Unavailable(f"cannot load {self.model_name!r}: {first_line(err)}") from None
        if not getattr(tokenizer, "chat_template", None):
            raise Unavailable(f"{self.model_name!r} has no chat template: not a chat model")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._yes, self._no = _answer_ids(tokenizer, ["Yes", " Yes"], ["No", " No"])
        self._model, self._tokenizer = model, tokenizer  # placed by load_causal_lm
        self._version = model_version(self.model_name)

    def prompts(self, items: Sequence[ScoreItem]) -> list[str]:
        """The exact chat-rendered texts given to the model, one per item."""
        self.load()
        return [
            render_chat(
                self._tokenizer,
                [Message(role="user", content=judge_prompt(i.response, i.dialogue.context))],
            )
            for i in items
        ]

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        """Replies to one dialogue share the history, so its tokens are run once per dialogue
        (a shared key-value prefix) and only each reply's own tokens run per reply."""
        texts = self.prompts(items)
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        values: list[float | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.dialogue.id, []).append(index)
        alone = []
        for group in groups.values():
            keep = shared_prefix([ids[i] for i in group]) if self.share_prefix else 0
            if len(group) > 1 and keep >= MIN_SHARED_PREFIX:
                for chunk in range(0, len(group), self.batch_size):
                    part = group[chunk : chunk + self.batch_size]
                    for index, value in zip(part, self._shared(ids, part, keep), strict=True):
                        values[index] = value
            else:
                alone += group
        for batch in _length_batches([len(ids[i]) for i in alone], self.batch_size):
            indices = [alone[b] for b in batch]
            for index, value in zip(indices, self._padded([ids[i] for i in indices]), strict=True):
                values[index] = value
        return values

    def _yes_probability(self, logits: Any) -> list[float]:
        import torch

        yes = torch.tensor(self._yes, device=logits.device)
        no = torch.tensor(self._no, device=logits.device)
        logits = logits[:, -1, :].float()
        margin = logits[:, yes].logsumexp(-1) - logits[:, no].logsumexp(-1)
        return torch.sigmoid(margin).tolist()

    def _padded(self, rows: list[list[int]]) -> list[float]:
        import torch

        model = self._model
        enc = self._tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(model.device)
        # Left padding: positions count real tokens only, as for an unpadded prompt.
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(**enc, position_ids=positions, logits_to_keep=1).logits
        return self._yes_probability(logits)

    def _shared(self, ids: list[list[int]], part: list[int], keep: int) -> list[float]:
        """Run ``ids[part][:keep]`` once, then every suffix against copies of its cache.

        Suffixes are left-padded between prefix and suffix; the attention mask hides the pads
        and positions continue from the prefix, so each value is the unshared one up to float
        rounding (tested).
        """
        import torch

        model = self._model
        device = model.device
        with torch.inference_mode():
            prefix = torch.tensor([ids[part[0]][:keep]], device=device)
            cache = model(input_ids=prefix, use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(part))
            enc = self._tokenizer.pad(
                {"input_ids": [ids[i][keep:] for i in part]}, return_tensors="pt"
            ).to(device)
            suffix_mask = enc["attention_mask"]
            mask = torch.cat(
                [torch.ones(len(part), keep, dtype=suffix_mask.dtype, device=device), suffix_mask],
                dim=1,
            )
            positions = keep + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=enc["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
        return self._yes_probability(logits)


# Below this many shared tokens, a separate prefix pass costs more than it saves.


@register_metric("coh")
class CohJudge(Metric):
    """Coherence from our embedded judge (default ``embedded-coh-judge``): p(coherent) of the
    reply given the turn it answers, the history, the responder's previous turn and the persona
    (``metrics/coherence_judge.py``). Trained offline as UniEval was, on real next turns against
    pseudo-negatives; checked against careful readers' labels.
    """

    description = "coherence judge: p(the reply is a coherent next turn of the dialogue)"
    failure_value = 0.0

    def __init__(self, model: str = EMBEDDED_COH_JUDGE, batch_size: int = 64) -> None:
        super().__init__()
        _check_batch_size(self.name, batch_size)
        self.model_name = model
        self.batch_size = batch_size
        self.judge: CoherenceJudge | None = None
        self._version: str | None = None

    @property
    def model(self) -> str:
        return self.model_name

    def settings(self) -> dict[str, Any]:
        spec = self.judge.spec if self.judge is not None else {}
        return {"name": self.name, "model": self.model_name, "version": self._version,
                "spec": spec}  # fmt: skip

    def load(self) -> None:
        if self.judge is not None:
            return
        folder = judge_folder(self.model_name)
        judge = CoherenceJudge(folder, batch_size=self.batch_size)
        judge.load()
        self.judge, self._version = judge, tree_digest(folder)

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        self.load()
        assert self.judge is not None
        inputs = [coherence_input(i.dialogue.context, i.response, i.dialogue.persona)
                  for i in items]  # fmt: skip
        return [float(p) for p in self.judge.probabilities(inputs)]


def judge_folder(name: str) -> Path:
    """A judge's folder: a shipped one by name, or a local directory."""
    if name in EMBEDDED_CLASSIFIERS:
        return embedded_dir(name)
    try:
        resolved = resolve(name)
    except InputError as err:
        raise Unavailable(err.message) from None
    if resolved.kind != "local":
        raise Unavailable(f"{name!r}: a coherence judge is a local folder or a shipped name")
    return Path(resolved.location)
