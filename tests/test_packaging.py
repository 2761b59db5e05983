"""The wheel carries what an installed relay needs outside the repo: migrations, SQL, py.typed."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
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
        "outbox/relay/queries_sqlite.sql",
        "outbox/py.typed",
        "outbox/relay/py.typed",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "bench/", "migrations/", "relay/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "outbox-relay = outbox.relay.__main__:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_lean_install_then_extras(tmp_path: Path) -> None:
    """`pip install outbox` brings the writer's side only; the relay's packages come with
    `[relay,...]`, and until then `outbox-relay` names the extra to install."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("outbox-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    # The fresh venv sees only what it installed: no OUTBOX_* settings, no PYTHONPATH.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PYTHON"))}

    def pip_install(requirement: str) -> set[str]:
        subprocess.run(
            [bin_dir / "python", "-m", "pip", "install", "-q", requirement],
            check=True,
            timeout=600,
            cwd=tmp_path,
            env=clean,
        )
        listed = subprocess.run(
            [bin_dir / "python", "-m", "pip", "list", "--format", "freeze"],
            check=True,
            capture_output=True,
            text=True,
            env=clean,
        ).stdout
        return {line.split("==")[0].lower() for line in listed.split()}

    def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [bin_dir / "outbox-relay", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=clean,
        )

    installed = pip_install(str(wheel))
    assert {"sqlalchemy", "pydantic"} <= installed
    heavy = {"asyncpg", "aiokafka", "redis", "fastapi", "alembic", "click", "structlog"}
    assert not installed & heavy, installed & heavy
    writer = (
        "from outbox import OutboxEvent, enqueue\n"
        "print(OutboxEvent(topic='orders', key='42', payload={'total': 1}).topic)\n"
    )
    done = subprocess.run(
        [bin_dir / "python", "-c", writer], capture_output=True, text=True, env=clean
    )
    assert done.stdout.strip() == "orders", done.stderr
    done = relay_cli("--help")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "pip install 'outbox[relay]'" in done.stderr

    installed = pip_install(f"outbox[relay,kafka] @ {wheel.as_uri()}")
    assert {"asyncpg", "aiokafka", "click"} <= installed
    assert not installed & {"redis", "fastapi"}
    assert relay_cli("--help").returncode == 0
    done = relay_cli("run", "--broker", "redis", "--database-url", "postgresql://127.0.0.1:1/x")
    assert done.returncode == 2
    assert "needs redis, which is not installed: pip install 'outbox[redis]'" in done.stderr
