"""One model thread for every reply of an ``Engine``; greedy requests decode together.

The model is not thread-safe, and a decode step costs much the same for one row as for eight
(every weight matrix is read once per step), so requests from any number of threads (the
server's request workers, a chat loop) are queued here and one thread runs the model. Greedy
requests join one ``SlotBatch`` as they arrive: continuous batching across requests, a
finished reply's slot taking the next waiting request before the next step. Other requests
(sampling, models slot decoding does not support) run alone through ``model.generate`` when
they reach the head of the line. A request called off by its caller (a client that hung up)
leaves its slot at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from persona_align.generation.slots import SlotBatch
from persona_align.inference.engine import Cancelled
from persona_align.prompting import MIN_SHARED_PREFIX

log = logging.getLogger(__name__)


class Job:
    """One reply to generate. ``sampling`` holds ``model.generate``'s decoding arguments for a
    reply that does not go through the slots (None: greedy, in a slot); ``cancelled`` is the
    caller's to set. The model thread reports new tokens through ``tokens``."""

    def __init__(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        cancelled: threading.Event,
        sampling: dict[str, Any] | None = None,
        seed: int | None = 0,
    ) -> None:
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.cancelled = cancelled
        self.sampling = sampling
        self.seed = seed
        self.sent = 0  # tokens reported so far; the model thread's
        self._updates: queue.SimpleQueue[list[int] | BaseException | None] = queue.SimpleQueue()

    def tokens(self) -> Iterator[list[int]]:
        """New tokens as the model thread makes them, until the reply ends; raises Cancelled
        when the reply was called off, or the error the model thread met."""
        while (update := self._updates.get()) is not None:
            if isinstance(update, BaseException):
                raise update
            yield update

    def report(self, tokens: list[int], done: bool) -> None:
        if len(tokens) > self.sent:
            self._updates.put(tokens[self.sent :])
            self.sent = len(tokens)
        if done:
            self._updates.put(None)

    def fail(self, error: BaseException) -> None:
        self._updates.put(error)


class _Watch(StoppingCriteria):
    """Reports ``model.generate``'s tokens as they come and stops it when the job is called off."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.job.report(input_ids[0, len(self.job.prompt) :].tolist(), done=False)
        stop = self.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class Scheduler:
    """Runs jobs on one model thread: up to ``slots`` greedy ones decoding together.

    ``stats`` counts replies, cancelled jobs, decode steps and the most rows one step decoded.
    """

    def __init__(
        self, model: Any, eos_ids: set[int], pad_token_id: int, slots: int, guesses: int = 4
    ) -> None:
        self.model = model
        self.eos_ids = eos_ids
        self.pad_token_id = pad_token_id
        self.slots = slots
        self.guesses = guesses
        self.stats = {"replies": 0, "cancelled": 0, "steps": 0, "most_rows": 0}
        self._batch: SlotBatch | None = None
        self._previous: list[int] = []  # the last prompt, until a shared prefix is found
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._starting: Job | None = None  # out of the line, not yet in a slot
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="persona-decode", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        """Replies decoding in slots now."""
        return self._batch.busy if self._batch is not None else 0

    def submit(self, job: Job) -> None:
        if self._closing:
            raise RuntimeError("the scheduler is closed")
        self._inbox.put(job)

    def close(self) -> None:
        """Finish the jobs already submitted, then end the model thread."""
        self._closing = True
        self._inbox.put(None)
        self._thread.join()

    # --- the model thread ------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._take(block=True):
                try:
                    self._busy()
                except Exception as err:  # a bug or out of memory: fail its jobs, not the thread
                    log.exception("decoding failed")
                    jobs = [*self._waiting, *([self._starting] if self._starting else [])]
                    if self._batch is not None:
                        jobs += [row.key for row in self._batch.live if row is not None]
                    for job in jobs:
                        job.fail(err)
                    self._waiting.clear()
                    self._starting = None
                    self._batch = None  # its rows may be half-updated

    def _take(self, block: bool) -> bool:
        """Move submitted jobs to the waiting line (waiting for one if ``block``); False once
        ``close`` was called and the line is empty."""
        try:
            job = self._inbox.get(block=block and not self._closing)
            while True:
                if job is None:
                    self._closing = True
                else:
                    self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return bool(self._waiting) or not self._closing

    def _busy(self) -> None:
        """Decode until no job is left."""
        if self._batch is None:
            self._batch = SlotBatch(
                self.model, self.slots, eos_ids=self.eos_ids, guesses=self.guesses
            )
        batch = self._batch
        with batch:
            while self._waiting or batch.busy:
                self._take(block=False)
                self._drop_cancelled(batch)
                self._admit(batch)
                if batch.busy:
                    self.stats["most_rows"] = max(self.stats["most_rows"], batch.busy)
                    self.stats["steps"] += 1
                    for row in batch.step():
                        self._reported(row.key, row.tokens, row.done)

    def _drop_cancelled(self, batch: SlotBatch) -> None:
        for row in [row for row in batch.live if row is not None and row.key.cancelled.is_set()]:
            batch.drop(row)
            self._cancelled(row.key)
        for job in [job for job in self._waiting if job.cancelled.is_set()]:
            self._waiting.remove(job)
            self._cancelled(job)

    def _admit(self, batch: SlotBatch) -> None:
        """Start waiting jobs in line order while slots are free; a job that needs no slot
        runs alone at once."""
        while self._waiting and (batch.free or self._waiting[0].sampling is not None):
            job = self._starting = self._waiting.popleft()
            if job.sampling is not None:
                self._alone(job)
            else:
                self._share_prefix(batch, job.prompt)
                row = batch.add(job, job.prompt, job.max_new_tokens)
                self._reported(job, row.tokens, row.done)
            self._starting = None

    def _share_prefix(self, batch: SlotBatch, prompt: list[int]) -> None:
        """Keep the keys/values of the longest token prefix recent prompts share (the chat
        template's header and the policy's instructions) and prefill only what follows it;
        the prefix only ever shrinks, and prompts sharing less of it are prefilled whole."""
        known = batch.prefix or self._previous
        common = next(
            (n for n, (a, b) in enumerate(zip(known, prompt, strict=False)) if a != b),
            min(len(known), len(prompt)),
        )
        common = min(common, len(prompt) - 1)  # the prompt keeps a token of its own
        if common == len(batch.prefix) or common < MIN_SHARED_PREFIX:
            self._previous = [] if batch.prefix else prompt
            return
        batch.set_prefix(prompt[:common])
        self._previous = []

    def _alone(self, job: Job) -> None:
        """``model.generate`` for one job, its tokens reported as they come."""
        if job.seed is None:
            torch.seed()  # a fresh draw, as OpenAI samples without a seed
        else:
            torch.manual_seed(job.seed)
        prompt = torch.tensor([job.prompt], device=self.model.device)
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=job.max_new_tokens,
            pad_token_id=self.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_Watch(job)]),
            **job.sampling,
        )
        if job.cancelled.is_set():
            self._cancelled(job)
        else:
            self._reported(job, out[0, len(job.prompt) :].tolist(), done=True)

    def _reported(self, job: Job, tokens: list[int], done: bool) -> None:
        job.report(tokens, done)
        self.stats["replies"] += done

    def _cancelled(self, job: Job) -> None:
        job.fail(Cancelled())
        self.stats["cancelled"] += 1
