"""SBS (Score Before You Speak, Saggar et al., ECAI 2025): score-conditioned SFT data.

Gold responses are augmented one noun at a time (``nouns``, ``fillers``), each augmentation
is scored by its similarity to the gold (``scoring``), and every response becomes an SFT
example whose prompt ends with ``Score: s`` (``dataset``); inference asks for ``Score: 1.0``.
"""

from persona_align.preference.sbs.dataset import (
    TASK,
    SBSConfig,
    append_score,
    build_sbs_dataset,
    completion_text,
    sbs_messages,
)
from persona_align.preference.sbs.fillers import FILLERS, Filler, make_filler, register_filler
from persona_align.preference.sbs.nouns import Slot, find_slots, load_spacy
from persona_align.preference.sbs.scoring import MetricScorer, Scorer, format_score

__all__ = [
    "FILLERS",
    "TASK",
    "Filler",
    "MetricScorer",
    "SBSConfig",
    "Scorer",
    "Slot",
    "append_score",
    "build_sbs_dataset",
    "completion_text",
    "find_slots",
    "format_score",
    "load_spacy",
    "make_filler",
    "register_filler",
    "sbs_messages",
]
