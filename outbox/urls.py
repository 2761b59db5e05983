"""Database URL helpers: one accepted spelling per driver, and passwords never logged."""

from __future__ import annotations

import re

_PG_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def is_postgres(url: str) -> bool:
    return _scheme(url) in _PG_SCHEMES


def is_sqlite(url: str) -> bool:
    return _scheme(url).startswith("sqlite")


def asyncpg_dsn(url: str) -> str:
    """`postgresql+asyncpg://...` and friends → the plain DSN asyncpg takes."""
    if not is_postgres(url):
        raise ValueError(f"database_url: {redact(url)!r} is not a postgresql:// URL")
    return "postgresql://" + url.split("://", 1)[1]


def sqlalchemy_async_url(url: str) -> str:
    """A SQLAlchemy async URL for the same database (asyncpg / aiosqlite drivers)."""
    if is_postgres(url):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if is_sqlite(url):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    raise ValueError(f"database_url: {redact(url)!r} is neither postgresql:// nor sqlite://")


#: `scheme:` and, when present, `//`: where a URL's user information starts.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//)?")
#: Passwords of the URLs this process was given, and their pieces: masked in any text.
_SECRETS: set[str] = set()


def redact(url: str) -> str:
    """The URL with its password replaced by '***', safe to log, whatever its shape: an
    unescaped '#', '?' or '/' in the password, a missing '//' or scheme. The last '@' ends the
    user information; without `scheme://` the user cannot be told apart, so all of it goes."""
    at = url.rfind("@")
    if at < 0:
        return url
    scheme = _SCHEME.match(url)
    if scheme is None or scheme.group(1) is None:
        return "***" + url[at:]
    userinfo = url[scheme.end() : at]
    if ":" not in userinfo:
        return url  # a user name only
    return f"{url[: scheme.end()]}{userinfo.split(':', 1)[0]}:***{url[at:]}"


def register_secret(url: str | None) -> None:
    """Remember the password of `url` (and its pieces, as a parser that split it at '#', '?',
    '/' or ':' would quote them), so that `redact_text` masks it wherever it shows up."""
    if not url or "@" not in url:
        return
    userinfo = url[: url.rfind("@")]
    scheme = _SCHEME.match(userinfo)
    if scheme is not None and scheme.group(1) is not None:
        userinfo = userinfo[scheme.end() :]
    password = userinfo.split(":", 1)[1] if ":" in userinfo else userinfo
    pieces = {password, *re.split(r"[#?/:@]", password)}
    _SECRETS.update(piece for piece in pieces if len(piece) >= 3)


def redact_text(text: str) -> str:
    """`text` with every URL's password and every registered secret masked."""
    if "@" in text:
        text = " ".join(redact(word) if "@" in word else word for word in text.split(" "))
    for secret in sorted(_SECRETS, key=len, reverse=True):  # longest first: whole before pieces
        if secret in text:
            text = text.replace(secret, "***")
    return text
