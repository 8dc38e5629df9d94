"""Candidate generation: responders behind one registry, a resumable cache, a runner.

Responders: ``hf`` (local transformers model), ``openai`` (any OpenAI-compatible server),
``import`` (existing responses), ``reference`` (the dataset's gold reply). Adding one is
adding a module with a ``@register_responder`` class and importing it here.
"""

from persona_align.generation import hf, importer, openai_responder, reference  # noqa: F401
from persona_align.generation.base import (
    RESPONDERS,
    GenerationParams,
    Responder,
    make_responder,
    make_responders,
)
from persona_align.generation.cache import GenerationCache
from persona_align.generation.runner import check_calls, run_responder, run_responders

__all__ = [
    "RESPONDERS",
    "GenerationCache",
    "GenerationParams",
    "Responder",
    "check_calls",
    "make_responder",
    "make_responders",
    "run_responder",
    "run_responders",
]
