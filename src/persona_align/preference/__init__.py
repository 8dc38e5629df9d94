"""Preference pairs from scored candidates: a total score, then pairing rules behind a registry."""

from persona_align.preference.pairs import RULES, PairingConfig, build_pairs
from persona_align.preference.total import DEFAULT_WEIGHTS, MinMax, fit_minmax, total_score

__all__ = [
    "DEFAULT_WEIGHTS",
    "RULES",
    "MinMax",
    "PairingConfig",
    "build_pairs",
    "fit_minmax",
    "total_score",
]
