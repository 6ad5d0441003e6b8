"""The lexical check a semantic-cache candidate must pass besides its cosine similarity.

A sentence embedding is close to a bag of meanings: it puts "convert Celsius to Fahrenheit" and
"convert Fahrenheit to Celsius", "is it safe" and "is it unsafe", "the sum of 1234 and 5678" and
"... 5679" within 0.99 of each other (measured on ``tests/data/semantic_pairs.tsv``), above any
threshold that still serves paraphrases. So a candidate is served only if, besides the threshold,
the two prompts

- have the same numbers (digit runs, as a set),
- the same negation parity (not, no, never, ...n't, without),
- no word of one whose antonym (a small list, and the prefixes un-/dis-/in-/non-/de-) is in the other,
- the same names: words capitalised inside the sentence (possessives dropped, function words ignored),
- and no direction reversed: the content words either side of "to"/"into" ("A to B" is not "B to A").

Each rule only refuses: it can lower the hit rate, never raise the false-hit rate.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
NEGATIONS = frozenset({"not", "no", "never", "without", "nothing", "none", "nobody", "neither", "nor", "cannot"})
STOPWORDS = frozenset("""a an the of to in on at for by with from into onto about as is are was were be been being
do does did doing done have has had i me my you your we our they their it its this that these those what whats
which who whom whose how when where why can could should would will shall may might must please tell give
me show explain describe there here some any way best good most much many one so and or if than then just
s use using get make way""".split())
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("on", "off"), ("start", "stop"), ("increase", "decrease"), ("gain", "lose"), ("upload", "download"),
    ("rise", "fall"), ("pros", "cons"), ("good", "bad"), ("happy", "sad"), ("largest", "smallest"),
    ("biggest", "smallest"), ("first", "second"), ("first", "last"), ("read", "write"), ("open", "close"),
    ("begin", "end"), ("start", "end"), ("buy", "sell"), ("import", "export"), ("push", "pull"),
    ("add", "remove"), ("before", "after"), ("above", "below"), ("more", "less"), ("max", "min"),
    ("maximum", "minimum"), ("true", "false"), ("yes", "no"), ("hot", "cold"), ("old", "new"),
    ("older", "younger"), ("high", "low"), ("higher", "lower"), ("win", "lose"), ("accept", "reject"),
    ("allow", "deny"), ("include", "exclude"), ("input", "output"), ("send", "receive"), ("left", "right"),
    ("sunrise", "sunset"), ("north", "south"), ("east", "west"), ("full", "empty"), ("sun", "shade"),
    ("select", "delete"), ("create", "delete"), ("insert", "delete"), ("encode", "decode"), ("in", "out"),
    ("enable", "disable"), ("encrypt", "decrypt"), ("born", "die"), ("born", "died"), ("beginner", "expert"),
    ("primary", "secondary"), ("boiling", "freezing"), ("cause", "effect"), ("causes", "consequences"),
)
_DIRECTION = frozenset({"to", "into"})
_ANTONYM_OF: dict[str, set[str]] = {}
for _a, _b in ANTONYMS:
    _ANTONYM_OF.setdefault(_a, set()).add(_b)
    _ANTONYM_OF.setdefault(_b, set()).add(_a)
_PREFIXES = ("un", "dis", "in", "im", "non", "de", "anti")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _norm(word: str) -> str:
    w = word.lower().replace("\u2019", "'")
    for tail in ("'s", "'"):
        if w.endswith(tail):
            w = w[: -len(tail)]
    return w


def _negations(words: list[str]) -> int:
    return sum(1 for w in words if _norm(w) in NEGATIONS or _norm(w).endswith("n't"))


def _names(words: list[str]) -> set[str]:
    out = set()
    for i, w in enumerate(words):
        if i > 0 and w[:1].isupper() and _norm(w) not in STOPWORDS:
            out.add(_norm(w))
    return out


def _opposed(a: set[str], b: set[str]) -> bool:
    for w in a - b:
        if _ANTONYM_OF.get(w, set()) & b:
            return True
        for p in _PREFIXES:
            if (w.startswith(p) and w[len(p):] in b) or (p + w) in b:
                return True
    return False


def same_question(a: str, b: str) -> bool:
    """Whether nothing in the words of ``a`` and ``b`` says they ask different things."""
    wa, wb = _words(a), _words(b)
    if set(_NUMBER.findall(a)) != set(_NUMBER.findall(b)):
        return False
    if _negations(wa) % 2 != _negations(wb) % 2:
        return False
    la = {_norm(w) for w in wa}
    lb = {_norm(w) for w in wb}
    if _opposed(la, lb) or _opposed(lb, la):
        return False
    if _names(wa) != _names(wb):
        return False
    da, db = _directions(wa), _directions(wb)
    return not any((y, x) in db for x, y in da)


def _directions(words: list[str]) -> set[tuple[str, str]]:
    """(x, y) for every "x ... to/into ... y": the nearest content words either side."""
    norm = [_norm(w) for w in words]
    out = set()
    for i, w in enumerate(norm):
        if w in _DIRECTION:
            before = next((n for n in reversed(norm[:i]) if n not in STOPWORDS and n not in _DIRECTION), None)
            after = next((n for n in norm[i + 1:] if n not in STOPWORDS and n not in _DIRECTION), None)
            if before and after:
                out.add((before, after))
    return out
