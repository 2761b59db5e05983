"""Subprocesses (relays, writers) and what they cost: CPU seconds, peak RSS, server CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench.infra import REPO, Services, poll

VENV_BIN = Path(sys.executable).parent


def relay_argv(
    database_url: str, broker: str, services: Services, relay_id: str, *extra: str
) -> list[str]:
    """The real `outbox-relay run`, as users start it."""
    script = VENV_BIN / "outbox-relay"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "outbox.relay.cli"]
    return [
        *head,
        "run",
        "--database-url",
        database_url,
        "--broker",
        broker,
        "--kafka-bootstrap",
        services.kafka_bootstrap,
        "--redis-url",
        services.redis_url,
        "--relay-id",
        relay_id,
        "--log-format",
        "json",
        "--log-level",
        "warning",
        *extra,
    ]


def module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Proc:
    """A child process whose stderr goes to a log file; stopped with SIGTERM."""

    def __init__(self, argv: Sequence[str], log: Path, *, stdin: bool = False) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        self.ps = psutil.Process(self.popen.pid)

    def go(self) -> None:
        """Send a line on stdin (writers wait for it before starting the clock)."""
        if self.popen.stdin is not None:
            self.popen.stdin.write(b"go\n")
            self.popen.stdin.flush()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def peak_rss_mb(self) -> float:
        """VmHWM: the kernel's high-water mark of resident memory."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.popen.poll() is None

    async def wait(self, timeout: float) -> int:
        async def exited() -> bool:
            return self.popen.poll() is not None

        await poll(exited, 0.05, timeout)
        return int(self.popen.returncode)

    async def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                await self.wait(timeout)
            except TimeoutError:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _server_of(proc: psutil.Process) -> str | None:
    try:
        name = proc.name()
        if name == "postgres":
            return "postgres"
        if name.startswith("redis-server"):
            return "redis"
        if name == "java" and "kafka.Kafka" in " ".join(proc.cmdline()):
            return "kafka"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return None


class ServerCpu:
    """CPU seconds the Postgres, Redis and Kafka processes used between start() and stop().

    Processes that exit in between (short-lived autovacuum workers) are missed, and other
    people's load on the same servers is counted: the figures are an upper bound of ours."""

    def __init__(self) -> None:
        self._before: dict[int, float] = {}

    @staticmethod
    def _sample() -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter():
            server = _server_of(proc)
            if server is None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                out[proc.pid] = (server, float(t.user + t.system))
        return out

    def start(self) -> None:
        self._before = {pid: cpu for pid, (_, cpu) in self._sample().items()}

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {"postgres": 0.0, "redis": 0.0, "kafka": 0.0}
        for pid, (server, cpu) in self._sample().items():
            used[server] += cpu - self._before.get(pid, 0.0)
        return {k: round(v, 2) for k, v in used.items()}
