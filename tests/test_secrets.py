"""Passwords never reach stderr or the logs, whatever shape the URL that carries them has."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_schema import outbox_cli

pytestmark = pytest.mark.unit

#: A password whose pieces are easy to spot, with the characters that break URL parsing.
PASSWORD = "Xq7#Zr9?Wp4/Kd2"
PIECES = ("Xq7", "Zr9", "Wp4", "Kd2")

MALFORMED = [
    f"postgresql://outbox:{PASSWORD}@127.0.0.1:5432/outbox",  # '#', '?', '/' unescaped
    f"postgresql:outbox:{PASSWORD}@127.0.0.1/outbox",  # no //
    f"outbox:{PASSWORD}@127.0.0.1/outbox",  # no scheme
    f"postgresql//outbox:{PASSWORD}@127.0.0.1/outbox",  # no colon
    f"postgres ql://outbox:{PASSWORD}@127.0.0.1/outbox",  # a space in the scheme
    f"postgresql://outbox:{PASSWORD}@127.0.0.1:notaport/outbox",
    f"sqlite://outbox:{PASSWORD}@/x.db",
]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return outbox_cli(*args, env=environ | {"OUTBOX_LOG_FORMAT": "json"}, cwd=cwd)


@pytest.mark.parametrize("url", MALFORMED)
@pytest.mark.parametrize(
    "command",
    [("run",), ("migrate",), ("dlq", "list"), ("status", "--check")],
    ids=["run", "migrate", "dlq", "status"],
)
def test_a_malformed_database_url_never_shows_its_password(
    url: str, command: tuple[str, ...], tmp_path: Path
) -> None:
    done = cli(*command, "--database-url", url, cwd=tmp_path)  # `/x.db` may open ./x.db
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert [piece for piece in PIECES if piece in output] == [], output
    assert "Traceback" not in output
    assert done.stderr.strip().splitlines()[-1].startswith("outbox-relay: error: ")


def test_redact_masks_the_password_of_any_url_shape() -> None:
    from outbox.urls import redact

    for url in MALFORMED:
        masked = redact(url)
        assert [piece for piece in PIECES if piece in masked] == [], masked
    assert redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert redact("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("postgresql://h/db") == "postgresql://h/db"


def test_log_lines_are_redacted_too() -> None:
    import io
    import json
    import logging

    import structlog

    from outbox.relay.logs import configure_logging
    from outbox.urls import register_secret

    register_secret(f"postgresql://u:{PASSWORD}@h/db")
    stream = io.StringIO()
    configure_logging("json", "info")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=stream))
    structlog.get_logger("t").warning("store_unavailable", error=f"bad port in 'u:{PASSWORD}@h'")
    line = json.loads(stream.getvalue())
    assert [piece for piece in PIECES if piece in json.dumps(line)] == [], line
    root = logging.getLogger()  # configure_logging's root handler holds this test's stderr
    for handler in [h for h in root.handlers if getattr(h, "outbox_relay", False)]:
        root.removeHandler(handler)
