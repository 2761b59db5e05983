"""The wheel carries what an installed relay needs outside the repo: migrations, SQL, py.typed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_wheel_ships_migrations_queries_and_types(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("outbox-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "outbox/migrations/env.py",
        "outbox/migrations/script.py.mako",
        "outbox/migrations/versions/0001_initial.py",
        "outbox/migrations/versions/0002_notify_setting.py",
        "outbox/migrations/versions/0005_notify_debounce.py",
        "outbox/relay/queries.sql",
        "outbox/py.typed",
        "outbox/relay/py.typed",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "bench/", "migrations/", "relay/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "outbox-relay = outbox.relay.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
