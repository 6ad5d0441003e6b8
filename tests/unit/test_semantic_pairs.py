"""The semantic cache's decision on a labelled set of prompt pairs (tests/data/semantic_pairs.tsv):
117 paraphrases and 218 pairs that ask something else — same topic, negations, other numbers,
other names, reversed directions. At the catalog's default threshold the false-hit rate (a
different question served another's answer) must be at most 1%; the hit rate on paraphrases is
reported (docs/COST_CONTROLS.md quotes it from this test's output).
"""

from __future__ import annotations

import numpy as np

from config.catalog import load_catalog
from tars_tasks.semantic_guard import same_question
from tests.semantic_support import labelled_pairs, needs_extra


def _decisions(threshold: float) -> tuple[list[bool], list[bool], np.ndarray]:
    from tars_tasks.embedding import embed

    pairs = labelled_pairs()
    a = embed([p[1] for p in pairs])
    b = embed([p[2] for p in pairs])
    sims = (a * b).sum(axis=1)
    served = [bool(s >= threshold) and same_question(x, y) for s, (_, x, y) in zip(sims, pairs, strict=True)]
    return [p[0] for p in pairs], served, sims


@needs_extra
def test_the_default_threshold_serves_at_most_one_percent_of_different_questions():
    catalog = load_catalog()
    thresholds = {catalog.spec(t).semantic_threshold for t in catalog.tiers}
    assert len(thresholds) == 1
    threshold = thresholds.pop()
    labels, served, sims = _decisions(threshold)
    negatives = [s for lab, s in zip(labels, served, strict=True) if not lab]
    positives = [s for lab, s in zip(labels, served, strict=True) if lab]
    false_hit = sum(negatives) / len(negatives)
    hit = sum(positives) / len(positives)
    raw_false = sum(1 for lab, s in zip(labels, sims, strict=True) if not lab and s >= threshold) / len(negatives)
    print(f"\nsemantic pairs at threshold {threshold}: false-hit rate {false_hit:.2%} ({sum(negatives)}/"
          f"{len(negatives)}), paraphrase hit rate {hit:.2%} ({sum(positives)}/{len(positives)}); "
          f"cosine alone would serve {raw_false:.2%} of the different questions")
    pairs = labelled_pairs()
    guard = [same_question(x, y) for _, x, y in pairs]
    for t in (0.85, 0.88, 0.90, 0.92):
        fh = sum(1 for lab, s, g in zip(labels, sims, guard, strict=True) if not lab and s >= t and g)
        ph = sum(1 for lab, s, g in zip(labels, sims, guard, strict=True) if lab and s >= t and g)
        print(f"  threshold {t:.2f}: false hits {fh / len(negatives):.2%}, "
              f"paraphrases served {ph / len(positives):.2%}")
    assert len(negatives) >= 200 and len(positives) >= 100
    assert false_hit <= 0.01
    assert hit >= 0.6  # a threshold that serves nothing would pass the first assertion


@needs_extra
def test_embeddings_are_normalised_and_deterministic():
    from tars_tasks.embedding import DIMENSIONS, embed

    v = embed(["What is the capital of Italy?", "What is the capital of Italy?"])
    assert v.shape == (2, DIMENSIONS) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert np.array_equal(v[0], v[1])
