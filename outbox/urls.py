"""Database URL helpers: one accepted spelling per driver, and passwords never logged."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_PG_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def is_postgres(url: str) -> bool:
    return _scheme(url) in _PG_SCHEMES


def is_sqlite(url: str) -> bool:
    return _scheme(url).startswith("sqlite")


#: SQLAlchemy's asyncpg spelling `ssl=...` → libpq's `sslmode=...`.
_SSL_TO_SSLMODE = {"true": "require", "1": "require", "on": "require", "yes": "require"} | {
    "false": "disable",
    "0": "disable",
    "off": "disable",
    "no": "disable",
}
#: libpq's TLS files, which asyncpg reads from a DSN but not as connect() keywords.
_TLS_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword")


def _with_query(url: str, rename: Callable[[str, str], tuple[str, str]]) -> str:
    base, sep, query = url.partition("?")
    if not sep:
        return url
    params = [rename(k, v) for k, v in parse_qsl(query, keep_blank_values=True)]
    return base + "?" + urlencode(params, safe="/:")


def asyncpg_dsn(url: str) -> str:
    """`postgresql+asyncpg://...` and friends → the plain DSN asyncpg takes. libpq's TLS
    parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) pass through, and `ssl=true`
    becomes `sslmode=require`; PGSSLMODE and friends in the environment work as in libpq."""
    if not is_postgres(url):
        raise ValueError(f"database_url: {redact(url)!r} is not a postgresql:// URL")
    dsn = "postgresql://" + url.split("://", 1)[1]
    if "ssl=" not in dsn:
        return dsn

    def rename(key: str, value: str) -> tuple[str, str]:
        if key == "ssl":
            return "sslmode", _SSL_TO_SSLMODE.get(value.lower(), value)
        return key, value

    return _with_query(dsn, rename)


def async_engine(url: str, **kw: Any) -> AsyncEngine:
    """A SQLAlchemy async engine for `url` that connects as asyncpg itself would from the URL,
    TLS files included (SQLAlchemy's asyncpg dialect passes URL parameters to asyncpg as
    keywords, and `sslrootcert` is not one)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    if not is_postgres(url):
        return create_async_engine(sqlalchemy_async_url(url), **kw)
    import asyncpg

    dsn = asyncpg_dsn(url)

    async def connect() -> Any:
        return await asyncpg.connect(dsn)

    return create_async_engine("postgresql+asyncpg://", async_creator=connect, **kw)


def sqlalchemy_async_url(url: str) -> str:
    """A SQLAlchemy async URL for the same database (asyncpg / aiosqlite drivers). With TLS
    files in the URL, use `async_engine(url)` instead."""
    if is_postgres(url):
        dsn = asyncpg_dsn(url)
        if any(f"{name}=" in dsn for name in _TLS_FILES):
            raise ValueError(
                f"database_url: {redact(url)!r} names TLS files, which SQLAlchemy's asyncpg "
                "dialect cannot pass on: build the engine with outbox.urls.async_engine(url)"
            )

        def rename(key: str, value: str) -> tuple[str, str]:
            return ("ssl", value) if key == "sslmode" else (key, value)

        return _with_query("postgresql+asyncpg://" + dsn.split("://", 1)[1], rename)
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


def register_password(password: str | None) -> None:
    """Remember a secret given on its own, not in a URL (a SASL or key password), so that
    `redact_text` masks it. Like URL passwords, one shorter than 3 characters is not masked:
    masking every 'a' would garble the logs."""
    if password and len(password) >= 3:
        _SECRETS.add(password)


def redact_text(text: str) -> str:
    """`text` with every URL's password and every registered secret masked."""
    if "@" in text:
        text = " ".join(redact(word) if "@" in word else word for word in text.split(" "))
    for secret in sorted(_SECRETS, key=len, reverse=True):  # longest first: whole before pieces
        if secret in text:
            text = text.replace(secret, "***")
    return text
