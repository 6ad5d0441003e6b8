"""One clear line, never a traceback, for a user's or the environment's mistake on the CLI.

``tars`` turns these into ``error: <one line>`` on stderr and exit status 2:

* every :class:`~tars_tasks.errors.TarsError` (bad input, overload, missing schema, ...);
* Redis or the broker unreachable (redis-py, kombu), Postgres unreachable or refusing
  (SQLAlchemy/psycopg operational errors), a database without the TARS schema;
* text that is not valid UTF-8 or holds a NUL character (arguments, standard input);
* a bad ``TARS_*`` setting (pydantic), an unusable database URL, a file that cannot be written.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

#: Longest message printed; longer ones (a 200 kB repr of a bad value) are cut.
MAX_MESSAGE_CHARS = 300
EXIT_USAGE = 2


def _first_line(text: object) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def message_for(exc: BaseException) -> str | None:
    """The one-line message for ``exc``, or None when it is not a user or environment mistake."""
    from tars_tasks.errors import TarsError

    if isinstance(exc, TarsError):
        return _first_line(exc)
    if isinstance(exc, UnicodeError):
        return f"input is not valid UTF-8 text: {_first_line(exc)}"
    try:
        import redis.exceptions as rex

        if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
            return f"Redis unavailable: {_first_line(exc)}"
        if isinstance(exc, rex.ResponseError | rex.AuthenticationError):
            return f"Redis refused the command: {_first_line(exc)}"
    except ImportError:  # pragma: no cover
        pass
    try:
        import kombu.exceptions

        if isinstance(exc, kombu.exceptions.OperationalError):
            return f"broker unavailable: {_first_line(exc)}"
    except ImportError:  # pragma: no cover
        pass
    try:
        import sqlalchemy.exc as sx

        if isinstance(exc, sx.ProgrammingError | sx.OperationalError) and _no_schema(exc):
            return "the database has no TARS schema (or an old one): run `tars db upgrade`"
        if isinstance(exc, sx.OperationalError | sx.InterfaceError | sx.TimeoutError):
            return f"database unavailable: {_first_line(getattr(exc, 'orig', None) or exc)}"
        if isinstance(exc, sx.ArgumentError | sx.NoSuchModuleError):
            return f"bad database URL (TARS_DATABASE_URL): {_first_line(exc)}"
        if isinstance(exc, sx.DBAPIError):
            return f"the database refused the statement: {_first_line(getattr(exc, 'orig', None) or exc)}"
    except ImportError:  # pragma: no cover
        pass
    try:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            return f"database unavailable: {_first_line(exc)}"
    except ImportError:  # pragma: no cover
        pass
    try:
        import pydantic

        if isinstance(exc, pydantic.ValidationError):
            errs = exc.errors()
            where = ".".join(str(x) for x in errs[0]["loc"]) if errs else "?"
            return f"invalid setting TARS_{where.upper()}: {errs[0]['msg'] if errs else exc}"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        target = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or _first_line(exc)}{target}"
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"service unavailable: {_first_line(exc)}"
    return None


def _no_schema(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text) or (
        "no such column" in text) or ("column" in text and "does not exist" in text)


def check_text(value: str, *, what: str) -> str:
    """``value`` unchanged, or :class:`InvalidRequest` if it holds a NUL or is not valid UTF-8
    (Python hands undecodable argument bytes over as lone surrogates)."""
    from tars_tasks.errors import InvalidRequest

    if "\x00" in value:
        raise InvalidRequest(f"{what} contains a NUL character (at offset {value.index(chr(0))}); text may not")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{what} is not valid UTF-8 (undecodable byte at offset {exc.start})") from None
    return value


def read_stdin_text(*, what: str) -> str:
    """Standard input as strict UTF-8 text without NUL, or :class:`InvalidRequest`."""
    from tars_tasks.errors import InvalidRequest

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} from standard input is not valid UTF-8 (byte 0x{data[exc.start]:02x} at "
                             f"offset {exc.start})") from None
    return check_text(text, what=f"{what} from standard input")


def check_argv(argv: list[str]) -> None:
    """Every command-line argument is valid UTF-8 (checked before any command runs)."""
    for i, arg in enumerate(argv, 1):
        check_text(arg, what=f"argument {i}")
