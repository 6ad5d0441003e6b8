"""Refuse to start a fleet guarded by the example passwords of ``.env.example``.

``.env.example`` ships placeholders (``change-me-postgres``, ``change-me-redis``,
``change-me-flower``) so that ``docker compose config`` works on a fresh checkout. A fleet
started with one of them is guarded by a password anyone can read in the repository. Every
way of starting services refuses any password that starts with ``change-me`` (any case), with
one line naming the variables: ``tars flower``, ``tars fleet up``, and under docker compose the
``check-secrets`` service (``tars fleet check-secrets``) that every other service waits for.
Compose's own ``${VAR:?}`` only refuses *empty* values, so it cannot do this by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from tars_tasks.errors import ConfigurationError

PLACEHOLDER_PREFIX = "change-me"

#: Variables that are passwords.
PASSWORD_VARIABLES = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "TARS_FLOWER_PASSWORD")
#: Variables that are URLs with a password inside.
URL_VARIABLES = ("TARS_BROKER_URL", "TARS_DATABASE_URL", "TARS_REDIS_URL")


def is_placeholder(password: str | None) -> bool:
    """True for a password that starts with ``change-me`` (ignoring case and surrounding spaces)."""
    return bool(password) and password.strip().lower().startswith(PLACEHOLDER_PREFIX)


def url_password(url: str | None) -> str | None:
    """The password inside ``scheme://user:password@host/...``, if there is one."""
    if not url or "://" not in url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL we can read; other checks report it
        return None
    return unquote(password) if password else None


def placeholders_in(values: Mapping[str, str | None]) -> list[str]:
    """Names of the variables whose password (or URL's password) is a placeholder."""
    out = []
    for name, value in values.items():
        password = url_password(value) if name in URL_VARIABLES else value
        if is_placeholder(password):
            out.append(name)
    return out


def refuse_placeholders(values: Mapping[str, str | None]) -> None:
    """Raise :class:`ConfigurationError` (one line) if any value is a placeholder password."""
    names = placeholders_in(values)
    if names:
        verb = "holds" if len(names) == 1 else "hold"
        raise ConfigurationError(
            f"refusing to start: {', '.join(names)} still {verb} a placeholder password from .env.example "
            f"('{PLACEHOLDER_PREFIX}...'); set a real password (docs/OPERATIONS.md, Secrets)"
        )
