"""A simulated model: the tier's latency profile, injected failures, sized token counts.

It sleeps with ``time.sleep``, which gevent patches in the worker, so hundreds of calls
wait concurrently in one process. With ``TARS_SIM_SEED`` set, a (request, attempt) pair
always gets the same latency, failure and response.

It honours the request as a model would: the answer's length is drawn from the tier's
``output_tokens`` and cut at the request's ``max_tokens`` (``stop_reason`` ``max_tokens``), or at
the first of its ``stop`` sequences (``stop_sequence``, the sequence itself left out); in JSON
mode the answer is one JSON object. Input tokens are estimated over the whole request (system
prompt and every turn).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time

from config.catalog import LatencyProfile, ModelSpec
from config.pricing import Usage
from tars_tasks.errors import TransientProviderError
from workers.providers.base import Completion
from workers.providers.request import ModelRequest, estimate_tokens

#: A prompt holding ``<<sim-answer:TEXT>>`` is answered with TEXT (the last one wins): how tests and
#: load runs script a validator's verdict or a planner's JSON list without a real model.
SCRIPTED_ANSWER = re.compile(r"<<sim-answer:(.*?)>>", re.S)
_FILLER = "The analysis finds the request well-formed and answers it in full. "
#: ``{"answer": ""}``: what JSON mode wraps around the answer.
_JSON_OVERHEAD_CHARS = len(json.dumps({"answer": ""}))


def answer(*, out_tokens: int, request: ModelRequest, limit: int) -> tuple[str, str]:
    """The simulated answer text and its stop reason (pure: the tests call it directly)."""
    stop_reason = "end_turn"
    if out_tokens > limit:
        out_tokens, stop_reason = limit, "max_tokens"
    chars = out_tokens * 4
    text = (_FILLER * (chars // len(_FILLER) + 1))[:chars]
    cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
    if cut >= 0:
        text, stop_reason = text[:cut], "stop_sequence"
    if request.json_mode:
        text = json.dumps({"answer": text[: max(0, chars - _JSON_OVERHEAD_CHARS)]})
    return text, stop_reason


def sample_latency_ms(profile: LatencyProfile, rng: random.Random) -> float:
    if profile.distribution == "fixed":
        return profile.low_ms
    if profile.distribution == "uniform":
        return rng.uniform(profile.low_ms, profile.high_ms)
    return rng.lognormvariate(math.log(max(profile.median_ms, 1e-9)), profile.sigma)


class SimulatedProvider:
    name = "simulated"

    def __init__(
        self,
        *,
        latency: LatencyProfile | None = None,
        failure_rate: float | None = None,
        seed: int | None = None,
        crash_marker: str | None = None,
        unstorable_marker: str | None = None,
        sleep=time.sleep,
    ) -> None:
        self.latency_override = latency
        #: Fault injection: a prompt containing this text kills the worker process mid-call
        #: (``os._exit``), the way an out-of-memory kill or a segfault in a C library would.
        self.crash_marker = crash_marker
        #: Fault injection: a prompt containing this text gets an answer Postgres cannot store
        #: (a NUL character), the way a model's raw output sometimes is.
        self.unstorable_marker = unstorable_marker
        self.failure_rate_override = failure_rate
        self.seed = seed
        self._sleep = sleep

    def _rng(self, request_id: str, attempt: int) -> random.Random:
        if self.seed is None:
            return random.Random()
        return random.Random(f"{self.seed}:{request_id}:{attempt}")

    def complete(self, *, spec: ModelSpec, request: ModelRequest, request_id: str, attempt: int) -> Completion:
        rng = self._rng(request_id, attempt)
        prompt = request.text()
        profile = self.latency_override or spec.latency
        failure_rate = spec.failure_rate if self.failure_rate_override is None else self.failure_rate_override
        latency_s = sample_latency_ms(profile, rng) / 1000.0
        if self.crash_marker and self.crash_marker in prompt:
            os._exit(137)
        fails = rng.random() < failure_rate
        if latency_s > 0:
            self._sleep(latency_s)
        if fails:
            raise TransientProviderError(f"simulated {spec.model} overloaded", status_code=529)
        text, stop_reason = answer(out_tokens=rng.randint(*spec.output_tokens), request=request,
                                   limit=request.output_limit(spec))
        scripted = SCRIPTED_ANSWER.findall(prompt)
        if scripted:
            text, stop_reason = scripted[-1], "end_turn"
        if self.unstorable_marker and self.unstorable_marker in prompt:
            text = "binary output: \x00\x01 " + text
        usage = Usage(input_tokens=request.estimated_input_tokens(), output_tokens=estimate_tokens(text) if text else 0)
        return Completion.of(text=text, usage=usage, stop_reason=stop_reason)
