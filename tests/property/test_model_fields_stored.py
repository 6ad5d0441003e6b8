"""Property, against the real Postgres and Redis: a request's model fields (system prompt, turns,
options, metadata) with any text Unicode allows — controls, emoji, RTL marks, BOMs, newlines — are
stored exactly as given (the role's defaults filled in for what was left out) and read back by the
worker's loader as the same model request; text Postgres cannot store is refused before any write."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from config.catalog import load_catalog
from tars_tasks.errors import InvalidRequest
from workers.loader import RequestLoader

CAT = load_catalog()
SPECIALS = "\n\r\t\x0b\x0c\x1b\x7f\x85\u2028\u2029\ufeff\uffff\u200f \u00a0é€😀\\\"'{}[]"
texts = st.text(alphabet=st.one_of(st.sampled_from(SPECIALS), st.characters(codec="utf-8", exclude_characters="\x00")),
                min_size=1, max_size=40).filter(lambda s: s.strip())
nasty = st.sampled_from(["a\x00b", "a\ud800b", "\udfff"])


@st.composite
def model_fields(draw) -> dict:
    fields: dict = {}
    if draw(st.booleans()):
        fields["system"] = draw(st.one_of(st.just(""), texts))
    turns = draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                 "content": st.one_of(texts, st.lists(
                                                     st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                                     min_size=1, max_size=2))}), max_size=3))
    if turns:
        fields["messages"] = [{"role": "user", "content": draw(texts)}, *turns]
    if draw(st.booleans()) or not turns or turns[-1]["role"] != "user":
        fields["prompt"] = draw(texts)
    for name, strategy in (("max_tokens", st.integers(1, 64_000)), ("temperature", st.floats(0, 1)),
                           ("stop", st.lists(texts, max_size=4)),
                           ("response_format", st.sampled_from(["text", "json"])),
                           ("metadata", st.dictionaries(st.text(alphabet="abcxyz_-.", min_size=1, max_size=8), texts,
                                                        max_size=4))):
        if draw(st.booleans()):
            fields[name] = draw(strategy)
    if draw(st.sampled_from(range(10))) == 7:  # now and then, text Postgres cannot store somewhere
        where = draw(st.sampled_from(["system", "prompt", "stop", "metadata"]))
        bad = draw(nasty)
        fields[where] = {"stop": [bad], "metadata": {"k": bad}}.get(where, bad)
    return fields


@pytest.mark.integration
def test_model_fields_are_stored_exactly_and_read_back_by_the_worker(client, db):
    loader = RequestLoader(engine=db, linger_ms=0.5)
    outcomes = {"stored": 0, "refused": 0}

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(role=st.sampled_from(sorted(CAT.roles)), fields=model_fields())
    def check(role, fields):
        with db.connect() as conn:
            before = conn.execute(text("SELECT count(*) FROM requests")).scalar_one()
        try:
            handle = client.submit(role=role, **fields)
        except InvalidRequest as exc:
            assert exc.field in ("system", "prompt", "stop", "metadata", "messages"), exc.field
            assert any(c in repr(fields) for c in ("\\x00", "\\ud800", "\\udfff")), (str(exc), fields)
            with db.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM requests")).scalar_one() == before
            outcomes["refused"] += 1
            return
        outcomes["stored"] += 1
        row = loader.get(handle.id)
        d = CAT.defaults_for(role)
        assert row.prompt == fields.get("prompt")
        assert row.messages == fields.get("messages")
        assert row.system == fields.get("system", d.system)
        assert row.max_tokens == fields.get("max_tokens", d.max_tokens)
        assert row.temperature == fields.get("temperature", d.temperature)
        assert row.stop == (fields["stop"] if "stop" in fields else (list(d.stop) if d.stop is not None else None))
        assert row.response_format == fields.get("response_format", d.response_format or "text")
        assert row.metadata == fields.get("metadata")
        req = row.model_request()
        assert req.turns[-1]["role"] == "user"
        assert len(req.turns) == len(fields.get("messages") or []) + ("prompt" in fields)

    try:
        check()
    finally:
        loader.close()
    assert outcomes["stored"] >= 80 and outcomes["refused"] >= 3, outcomes
