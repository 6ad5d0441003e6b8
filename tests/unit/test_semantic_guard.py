"""The semantic cache's pure parts without the extra: the lexical guard, the bucket (what must be
equal for two requests to share answers), and the one-line error naming the extra."""

from __future__ import annotations

import pytest

from tars_tasks import embedding
from tars_tasks.semantic import context_digest, prompt_and_context
from tars_tasks.semantic_guard import same_question


@pytest.mark.parametrize(("a", "b"), [
    ("What is 17 times 23?", "What is 17 times 24?"),
    ("Is coffee bad for your health?", "Is coffee not bad for your health?"),
    ("Why does my car start in the cold?", "Why won't my car start in the cold?"),
    ("How do I turn on dark mode?", "How do I turn off dark mode?"),
    ("Is it safe to eat raw eggs?", "Is it unsafe to eat raw eggs?"),
    ("How do I lock my screen?", "How do I unlock my screen?"),
    ("What is the capital of Austria?", "What is the capital of Australia?"),
    ("Convert 5 miles to kilometers.", "Convert 5 kilometers to miles."),
    ("How do I convert a string to an integer?", "How do I convert an integer to a string?"),
])
def test_the_guard_refuses_pairs_an_embedding_puts_side_by_side(a, b):
    assert not same_question(a, b) and not same_question(b, a)


@pytest.mark.parametrize(("a", "b"), [
    ("What is the capital of Italy?", "What's the capital of Italy?"),
    ("How do I reverse a list in Python?", "In Python, how can I reverse a list?"),
    ("How many days are there in a leap year?", "How many days does a leap year have?"),
    ("What is the square root of 144?", "What's the square root of 144?"),
    ("How do I clear the cache in Chrome?", "How can I clear Chrome's cache?"),
])
def test_the_guard_lets_paraphrases_through(a, b):
    assert same_question(a, b)


def _cols(**kw):
    base = {"prompt": "What is the capital of Italy?", "system": "Be brief.", "messages": None, "max_tokens": 100,
            "temperature": 0, "stop": None, "response_format": "text"}
    return {**base, **kw}


def test_the_bucket_is_everything_but_the_prompt_in_its_scope():
    def digest(cols, tenant="acme", shared=False):
        _, ctx = prompt_and_context(cols)
        return context_digest(context=ctx, tenant=tenant, shared=shared)

    same = digest(_cols())
    assert digest(_cols(prompt="Italy's capital?")) == same  # only the prompt differs: one bucket
    assert digest(_cols(system="Be long.")) != same
    assert digest(_cols(max_tokens=200)) != same
    assert digest(_cols(temperature=0.5)) != same
    assert digest(_cols(), tenant="other") != same
    assert digest(_cols(), shared=True) == digest(_cols(), tenant="other", shared=True)
    # a conversation: the last user turn is the prompt, earlier turns are context
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "What is the capital of Italy?"}]
    p, _ = prompt_and_context(_cols(prompt=None, messages=turns))
    assert p == "What is the capital of Italy?"
    assert prompt_and_context(_cols(prompt=None, messages=turns[:2])) is None  # the last turn is not the user's


def test_enabling_the_semantic_cache_without_the_extra_is_one_line_naming_it(monkeypatch):
    from tars_tasks.cache_lookup import CacheLookup, SemanticOptions
    from tars_tasks.errors import ConfigurationError

    monkeypatch.setattr(embedding, "_MODULES", ("tars_no_such_module_for_this_test",))
    assert not embedding.extra_installed()
    with pytest.raises(ConfigurationError) as e:
        embedding.require_extra()
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'tars-fleet[semantic]'" in msg

    class _Cache:
        redis = None
        namespace = "t"

    with pytest.raises(ConfigurationError):
        CacheLookup(cache=_Cache(), catalog=None, semantic=SemanticOptions())  # type: ignore[arg-type]
    CacheLookup(cache=_Cache(), catalog=None)  # type: ignore[arg-type]  # off: works as before
