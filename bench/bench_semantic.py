"""What the semantic cache adds to a submit (run on demand; needs the ``semantic`` extra).

    .venv/bin/python bench/bench_semantic.py --redis-url redis://127.0.0.1:6379/3 [--candidates 256] [--n 200]

One process, the real :class:`tars_tasks.cache_lookup.CacheLookup` on a real Redis (a namespace of
its own, deleted at the end). A bucket is filled with ``--candidates`` answers the way workers
fill it (park at submit, ``ResponseCache.put`` with the digest). Then, interleaved in rounds,
``--n`` lookups each of:

* **exact only** — ``look_up`` with the semantic cache off: an exact miss (today's cost);
* **semantic miss** — semantic on, a prompt of the same bucket that matches nothing: exact miss,
  embedding, bucket read, cosine, parking the embedding (the most a request pays);
* **semantic hit** — semantic on, a paraphrase of a filled prompt: the above plus the guard's
  text read and the answer's read;
* **embedding alone** — ``embed([prompt])``;
* **index alone** — the bucket's read (``HGETALL``) and the cosine over it, for one embedded prompt.

Reported: p50 / p99 / mean in ms per request, and the added cost (semantic miss - exact only).
Every prompt is new to the exact cache (a counter in it), so no lookup is an exact hit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECTS = ["the moon", "volcanoes", "the Roman Empire", "photosynthesis", "black holes", "jazz", "the Nile",
            "honey bees", "glaciers", "the printing press", "octopuses", "the Silk Road", "tectonic plates",
            "coral reefs", "the telescope", "penguins"]
ASPECTS = ["history", "main facts", "importance", "origin", "structure", "common myths", "future", "uses"]


def _prompt(i: int) -> str:
    subject = SUBJECTS[(i // len(ASPECTS)) % len(SUBJECTS)]
    return f"Tell me about the {ASPECTS[i % len(ASPECTS)]} of {subject}, part {i}."


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import redis

    from config.catalog import load_catalog
    from tars_tasks.cache import CachedAnswer, ResponseCache
    from tars_tasks.cache_lookup import CacheLookup, SemanticOptions
    from tars_tasks.embedding import embed
    from tars_tasks.schemas import request_columns, validate_spec

    catalog = load_catalog()
    client = redis.Redis.from_url(args.redis_url, socket_timeout=5)
    ns = f"bench-sem-{uuid.uuid4().hex[:8]}"
    cache = ResponseCache(redis_client=client, namespace=ns, max_entries=100_000, max_entry_bytes=65_536,
                          semantic_max_candidates=args.candidates)
    exact = CacheLookup(cache=cache, catalog=catalog)
    semantic = CacheLookup(cache=cache, catalog=catalog, semantic=SemanticOptions(threads=1))

    def item(prompt: str):
        spec = validate_spec({"role": "analyst", "prompt": prompt, "tier": "haiku", "temperature": 0},
                             catalog=catalog, max_prompt_chars=10_000)
        return [("haiku", "bench", request_columns(spec, catalog=catalog), None)]

    t0 = time.perf_counter()
    embed(["warm up"])
    load_s = time.perf_counter() - t0
    model = catalog.spec("haiku").model
    for i in range(args.candidates):  # fill the bucket as submits + workers do
        (v,) = semantic.look_up(item(_prompt(i)))
        cache.put(key=cache.key(model=model, digest=v.digest), digest=v.digest, ttl_s=600,
                  answer=CachedAnswer(text=f"answer {i}", stop_reason="end_turn", model=model, tier="haiku",
                                      cost_usd=Decimal("0.001"), source_request_id=str(i)))
    from tars_tasks.semantic import best

    times: dict[str, list[float]] = {"exact only": [], "semantic miss": [], "semantic hit": [], "embedding alone": [],
                                     "index alone": []}
    bucket = next(iter(client.scan_iter(f"{ns}:cache:s:*"))).decode().split(":cache:s:", 1)[1]
    hits = 0
    try:
        for r in range(args.n):
            fresh = f"What is a good name for a pet {r}-legged robot from planet {r * 7}?"
            t = time.perf_counter()
            exact.look_up(item(fresh))
            times["exact only"].append(time.perf_counter() - t)
            t = time.perf_counter()
            semantic.look_up(item(fresh + " Please answer."))
            times["semantic miss"].append(time.perf_counter() - t)
            j = r % args.candidates
            para = _prompt(j).replace("Tell me about", "Tell me something about")
            t = time.perf_counter()
            (v,) = semantic.look_up(item(para))
            times["semantic hit"].append(time.perf_counter() - t)
            hits += v.hit is not None
            t = time.perf_counter()
            vec = embed([fresh])[0]
            times["embedding alone"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ((digests, matrix),) = semantic.index.buckets([bucket])
            best(digests, matrix, vec, threshold=0.9)
            times["index alone"].append(time.perf_counter() - t)
    finally:
        keys = list(client.scan_iter(f"{ns}:*", count=1000))
        for k in range(0, len(keys), 500):
            client.delete(*keys[k:k + 500])
    out = {k: {"p50_ms": round(_pct(v, 0.5) * 1000, 2), "p99_ms": round(_pct(v, 0.99) * 1000, 2),
               "mean_ms": round(statistics.fmean(v) * 1000, 2)} for k, v in times.items()}
    added = statistics.median(times["semantic miss"]) - statistics.median(times["exact only"])
    summary = {"candidates": args.candidates, "n": args.n, "model_load_s": round(load_s, 2),
               "paraphrase_hits": f"{hits}/{args.n}", "added_p50_ms": round(added * 1000, 2), "timings": out,
               "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"bucket of {args.candidates} candidates, {args.n} rounds; model load {load_s:.2f} s; "
              f"paraphrases served {hits}/{args.n}; load average {os.getloadavg()[0]:.1f}")
        for k, v in out.items():
            print(f"  {k:16s} p50 {v['p50_ms']:8.2f} ms   p99 {v['p99_ms']:8.2f} ms   mean {v['mean_ms']:8.2f} ms")
        print(f"  added per request (semantic miss - exact only, p50): {added * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
