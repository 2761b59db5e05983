"""Database URL helpers: one accepted spelling per driver, and passwords never logged."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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


def redact(url: str) -> str:
    """The URL with its password replaced by '***', safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))
