"""The one error hierarchy of TARS fleet.

Producer-facing errors (bad input, overload, broker down) are raised before anything is
queued. Provider errors are raised inside sub-agents and decide retry versus fail.
"""

from __future__ import annotations

import reprlib

from tars_tasks.codes import AttemptOutcome, FailureReason

#: Longest rendering of a bad value in an error message (see :func:`excerpt`).
EXCERPT_CHARS = 80

_repr = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_repr.maxlevel, _repr.maxstring, _repr.maxlong, _repr.maxother = 2, EXCERPT_CHARS, 40, EXCERPT_CHARS
_repr.maxtuple = _repr.maxlist = _repr.maxarray = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 4
_repr.maxdeque = 4


def excerpt(value: object, *, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (``...`` marks the cut), for error messages.

    Always printable and encodable as UTF-8: NUL, control characters and lone surrogates come out
    escaped (``'a\\x00b'``), and a 200 kB string costs only its first ``limit`` characters.
    """
    if isinstance(value, str):  # cut before repr: cheap for huge values, no overridden __repr__
        text, cut = str.__repr__(str.__str__(value[:limit])), len(value) > limit
    elif isinstance(value, bytes | bytearray):
        text, cut = repr(bytes(value[:limit])), len(value) > limit
    else:
        try:
            text = _repr.repr(value)
        except Exception:  # a __repr__ that raises is the value's problem, not the message's
            text = f"<{type(value).__name__} object>"
        cut = False
    text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)
    if cut or len(text) > limit:
        text = text[: max(limit - 3, 1)] + "..."
    return text


def type_name(value: object) -> str:
    """The short name of ``value``'s type, for "got int" in an error message."""
    return excerpt(type(value).__qualname__, limit=40).strip("'") if value is not None else "None"


class TarsError(Exception):
    """Base of every error TARS raises on purpose."""


# --- producer side -----------------------------------------------------------------------------


class InvalidRequest(TarsError, ValueError):
    """The request is malformed; nothing was recorded or queued. Do not retry it as is.

    ``field`` names what is wrong (``"tenant"``, ``"run_id"``, ``"requests"`` for the container,
    or the unknown field's name); ``index`` is the bad request's position in a ``submit_many``
    call of more than one request. The message quotes the bad value only as an :func:`excerpt`.
    """

    def __init__(self, message: str, *, field: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


class Overloaded(TarsError):
    """Admission control refused the request: the fleet is beyond capacity. Retry later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceeded(TarsError):
    """The tenant's budget for a period is spent (settled plus reserved): nothing was recorded or
    queued. ``tenant`` and ``period`` (``day:YYYY-MM-DD`` / ``month:YYYY-MM``) name it."""

    def __init__(self, message: str, *, tenant: str, period: str) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.period = period


class BrokerUnavailable(TarsError):
    """The request could not be queued (broker unreachable). It was recorded as failed."""


class ConfigurationError(TarsError, ValueError):
    """An operations option or setting is missing or invalid; nothing was started."""


class DatabaseUnavailable(TarsError):
    """Postgres (or the embedded SQLite) could not be reached."""


class RequestNotFound(TarsError, LookupError):
    """No request has that id."""


class ResultTimeout(TarsError, TimeoutError):
    """The request did not reach a terminal state within the time waited."""


# --- sub-agent side ----------------------------------------------------------------------------


class ProviderError(TarsError):
    """A model API call failed. ``retryable`` says whether another attempt may succeed."""

    retryable: bool = False
    outcome: AttemptOutcome = AttemptOutcome.ERROR

    def __init__(self, message: str, *, status_code: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class TransientProviderError(ProviderError):
    """429, 5xx, overloaded, timeouts, dropped connections: worth another attempt."""

    retryable = True
    outcome = AttemptOutcome.TRANSIENT_ERROR


class RateLimited(TransientProviderError):
    """429: the provider's own limit (or ours, when the fleet limiter gives up waiting)."""

    outcome = AttemptOutcome.RATE_LIMITED


class ProviderOverloaded(TransientProviderError):
    """Anthropic's 529 ``overloaded_error``: the provider is short of capacity, not us over a limit."""

    outcome = AttemptOutcome.OVERLOADED


class ProviderTimeout(TransientProviderError):
    outcome = AttemptOutcome.TIMEOUT


class ProviderConnectionError(TransientProviderError):
    """The connection was refused, reset or closed before a full response arrived."""

    outcome = AttemptOutcome.CONNECTION_ERROR


class PermanentProviderError(ProviderError):
    """400, 403, 404, context too long: the same call will fail again."""

    outcome = AttemptOutcome.PERMANENT_ERROR


class ContextTooLong(PermanentProviderError):
    """400 because the prompt (plus ``max_tokens``) exceeds the model's context window."""

    outcome = AttemptOutcome.CONTEXT_TOO_LONG


class AuthenticationFailed(PermanentProviderError):
    """401: retrying risks a ban; the breaker opens for the model instead."""

    outcome = AttemptOutcome.AUTH_ERROR


class ProviderNotConfigured(PermanentProviderError):
    """The provider cannot be called at all (its API key variable is unset). No call was made."""

    outcome = AttemptOutcome.NOT_CONFIGURED


class FleetStateUnavailable(TarsError):
    """The fleet-state Redis (rate limiter, breaker) could not be reached within the retry budget;
    no call was made."""

    outcome = FailureReason.FLEET_STATE_UNAVAILABLE


class CircuitOpen(TarsError):
    """The fleet-wide breaker for a model is open; the call was not made."""

    outcome = FailureReason.CIRCUIT_OPEN

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- load generation ---------------------------------------------------------------------------


class LoadgenError(TarsError):
    """A load run could not be set up or carried out (bad scenario, fleet did not start)."""


class StagingError(TarsError):
    """A message could not be prepared for dispatch staging (e.g. the broker is not kombu's Redis
    transport, so there is no Redis list message to stage). See ``workers/dispatch.py``."""
