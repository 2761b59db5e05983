"""The README's tour ("See it happen"), run command by command as a user would.

The shared services are never stopped: the tour's `services.sh stop/start redis` act on a
throwaway redis-server of the test's own, and its relay works on the test's own database.
Every other command runs as written (`services.sh up` is a no-op on running services).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_redis_failures import REDIS_SERVER, free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def tour() -> list[str]:
    """The commands of the tour block in README.md, without their comments."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- tour:start -->", 1)[1].split("<!-- tour:end -->", 1)[0]
    body = block.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].rstrip() for line in body.splitlines() if line.strip()]


def test_the_tour_shows_each_step() -> None:
    commands = tour()
    assert commands[:3] == [
        "bash scripts/services.sh up",
        'eval "$(bash scripts/services.sh env)"',
        "outbox-relay migrate",
    ]
    assert "bash scripts/services.sh stop redis" in commands
    assert commands.count("python examples/write_one.py") == 2
    assert sum(c.startswith("outbox-relay tail orders") for c in commands) == 2


def script(tmp_path: Path, database_url: str, port: int) -> str:
    """The tour as one bash script: each command echoes a marker with its exit status."""
    redis = f"{shlex.quote(REDIS_SERVER)} --bind 127.0.0.1 --port {port} --save '' "
    redis += f"--appendonly no --daemonize yes --dir {tmp_path} "
    redis += f"--pidfile {tmp_path}/redis.pid --logfile {tmp_path}/redis.log"
    start = f"{redis} && until redis-cli -p {port} ping 2>/dev/null | grep -q PONG; do :; done"
    stand_ins = {
        "bash scripts/services.sh stop redis": f"redis-cli -p {port} shutdown nosave",
        "bash scripts/services.sh start redis": start,
    }
    ours = (
        f"export OUTBOX_DATABASE_URL={shlex.quote(database_url)}"
        f" OUTBOX_REDIS_URL=redis://127.0.0.1:{port}/0"
    )
    lines = ["set -u", f"cd {shlex.quote(str(ROOT))}", start]
    for n, command in enumerate(tour()):
        line = stand_ins.get(command, command).replace("relay.log", f"{tmp_path}/relay.log")
        lines.append(line)
        if command.startswith("eval "):  # the test's own database and redis, not the shared
            lines.append(ours)
        lines.append(f"echo @@step {n} rc=$? >&2")
    lines.append("wait")  # the relay, after `kill %1`
    lines.append("echo @@relay rc=$? >&2")
    return "\n".join(lines) + "\n"


def test_the_tour_runs(tmp_path: Path, database_url: str) -> None:
    if shutil.which("redis-cli") is None or not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server and redis-cli are needed")
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # outbox-relay and python of this venv
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    env["OUTBOX_LOG_FORMAT"] = "json"
    try:
        done = subprocess.run(
            ["bash", "-c", script(tmp_path, database_url, port)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            check=False,
        )
    finally:
        pid = tmp_path / "redis.pid"
        if pid.exists():
            subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False)
    steps = dict(re.findall(r"^@@step (\d+) rc=(\d+)$", done.stderr, re.MULTILINE))
    assert steps == {str(n): "0" for n in range(len(tour()))}, done.stderr
    assert re.search(r"^@@relay rc=0$", done.stderr, re.MULTILINE), done.stderr

    out = done.stdout.splitlines()
    assert [line.split("=")[0] for line in out[:3]] == [  # `services.sh up` prints the env
        "export OUTBOX_DATABASE_URL",
        "export OUTBOX_KAFKA_BOOTSTRAP",
        "export OUTBOX_REDIS_URL",
    ]
    assert re.fullmatch(r"migrated to \w+ \(head\)", out[3])
    first, second = (line for line in out if line.startswith("committed order "))
    events = [line for line in out if " type=OrderPlaced " in line]
    assert [e.split()[2] for e in events] == ["key=order-1", "key=order-2"], out
    assert (first, second) == (
        "committed order 1 and its OrderPlaced event",
        "committed order 2 and its OrderPlaced event",
    )
    log = (tmp_path / "relay.log").read_text()
    assert "broker_unavailable" in log
    assert "broker_recovered" in log
    assert "relay_stopped" in log


def test_the_demo_installs_what_the_tour_runs() -> None:
    """The tour starts from the venv `scripts/demo.sh` made: it must have the relay with both
    brokers, though a plain `pip install outbox` has neither (pyproject.toml's extras)."""
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    (extras,) = re.findall(r'pip install -q "\.\[([a-z,]+)\]"', demo)
    assert "all" in extras.split(",") or {"kafka", "redis"} <= set(extras.split(","))
