"""`outbox-relay demo` as a user runs it: a subprocess, no servers, a few seconds at most."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROW = re.compile(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", re.MULTILINE)
STORY = {  # what each committed order published, in order
    "order-1": ["OrderPlaced", "OrderPaid", "OrderShipped"],
    "order-2": ["OrderPlaced", "OrderPaid", "OrderShipped"],
    "order-3": ["OrderPlaced"],
}


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def section(self, title: str) -> str:
        """The text from the line starting with `title` to the next blank line."""
        start = self.stdout.index(f"\n{title}")
        end = self.stdout.find("\n\n", start + 1)
        return self.stdout[start : end if end != -1 else None]

    def published(self) -> list[tuple[int, str, str, str]]:
        """(seq, key, type, topic) rows of the 'Published' table, in printed order."""
        table = self.section("3. Published")
        return [(int(m[1]), m[2], m[3], m[4]) for m in ROW.finditer(table)]


def run_demo(tmpdir: Path, *args: str) -> Run:
    """Run the demo with TMPDIR pointing at `tmpdir`, so what it leaves behind is visible."""
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "outbox.relay.cli", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@pytest.fixture
def tmpdir_for_demo(tmp_path: Path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


def test_demo_tells_the_whole_story_quickly_and_cleans_up(tmpdir_for_demo: Path) -> None:
    run = run_demo(tmpdir_for_demo)

    assert run.returncode == 0, run.stderr
    assert run.seconds < 10
    assert "publish_failed" not in run.stderr  # relay logs do not clutter the demo

    rows = run.published()
    keys = [key for _, key, _, _ in rows]
    assert "order-4" not in keys  # its transaction rolled back
    assert "rolled back  order-4" in run.section("1. Business transactions")
    for key, story in STORY.items():
        mine = [(seq, kind) for seq, k, kind, _ in rows if k == key]
        assert [kind for _, kind in mine] == story
        assert [seq for seq, _ in mine] == sorted(seq for seq, _ in mine)
    assert all(topic == "orders" for *_, topic in rows)
    assert len({seq for seq, *_ in rows}) == len(rows) == 7

    dlq = run.section("4. Dead letters")
    assert "FROM outbox_dead_letters ORDER BY last_failed_at DESC;" in dlq
    assert re.search(r"orders\s+order-3\s+MessageRejected\s+the broker refused", dlq)
    assert "outbox-relay migrate" in run.stdout
    assert "--broker kafka" in run.stdout

    assert list(tmpdir_for_demo.iterdir()) == []  # the temporary directory is gone


def test_demo_says_it_removed_its_files_and_how_to_keep_them(tmpdir_for_demo: Path) -> None:
    run = run_demo(tmpdir_for_demo)

    assert run.returncode == 0, run.stderr
    removed = re.search(
        r"^Removed (\S+) \((.*)\): run `outbox-relay demo --keep`", run.stdout, re.M
    )
    assert removed is not None, run.stdout
    assert Path(removed[1]).parent == tmpdir_for_demo
    assert removed[2] == "the database and the JSON lines"
    assert run.stdout.index("JSON lines: ") < removed.start()


def test_demo_keep_and_jsonl(tmpdir_for_demo: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "published.jsonl"
    run = run_demo(tmpdir_for_demo, "--keep", "--jsonl", str(jsonl))

    assert run.returncode == 0, run.stderr
    kept = re.search(r"^Kept (\S+) ", run.stdout, re.MULTILINE)
    assert kept is not None
    workdir = Path(kept[1])
    assert workdir.parent == tmpdir_for_demo
    database = workdir / "outbox.db"
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)
        assert conn.execute("SELECT key FROM outbox_dead_letters").fetchall() == [("order-3",)]
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3,)

    lines = [json.loads(line) for line in jsonl.read_text("utf-8").splitlines()]
    assert [(e["seq"], e["key"], e["type"], e["topic"]) for e in lines] == run.published()
    assert lines[0]["payload"]["order_id"] == lines[0]["key"]

    # The replay line it printed runs as shown, on the kept file.
    replay = re.search(r"\(with --keep\): (outbox-relay dlq replay .+)$", run.stdout, re.M)
    assert replay is not None
    with sqlite3.connect(database) as conn:
        (dead,) = conn.execute("SELECT event_id FROM outbox_dead_letters").fetchone()
    argv = replay[1].replace("EVENT_ID", str(uuid.UUID(dead))).split()
    done = subprocess.run(
        [sys.executable, "-m", "outbox.relay", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "replayed 1" in done.stdout
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_dead_letters").fetchone() == (0,)
        assert conn.execute("SELECT key FROM outbox_events").fetchall() == [("order-3",)]
