"""Shared by the semantic-cache tests: the skip when the ``semantic`` extra is not installed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tars_tasks.embedding import extra_installed

PAIRS_PATH = Path(__file__).parent / "data" / "semantic_pairs.tsv"

needs_extra = pytest.mark.skipif(
    not extra_installed(),
    reason="the semantic cache's extra is not installed: pip install -e '.[dev,semantic]' (scripts/test does)")


def labelled_pairs() -> list[tuple[bool, str, str]]:
    """(is a paraphrase, a, b) for every pair of tests/data/semantic_pairs.tsv."""
    with PAIRS_PATH.open(newline="") as f:
        return [(r["label"] == "paraphrase", r["a"], r["b"]) for r in csv.DictReader(f, delimiter="\t")]
