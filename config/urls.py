"""Database URLs as TARS uses them: ``postgres://`` and ``postgresql://`` mean psycopg 3.

Here, below everything else, because the engine (core) and the migrations (which import
nothing of the application) both need it.
"""

from __future__ import annotations


def normalise_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` become ``postgresql+psycopg://`` (psycopg 3)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url
