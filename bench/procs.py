"""Subprocesses (relays, writers) and what they cost: CPU seconds, peak RSS, server CPU, and
the CPU of each part of a latency run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.infra import REPO, Services, poll
from bench.writer import WRITER_APP

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


class CpuByRole:
    """CPU seconds each part of a latency run used in a window: the relay (or faststream-outbox)
    and writer processes, the Postgres backends serving each (the writers' by their
    `application_name`, every other client backend the relay's), Postgres's own processes,
    the broker, and this process (the consumer); and how busy the whole machine was."""

    RELAY, WRITERS, CONSUMER = "relay", "writers", "consumer (harness)"
    PG_RELAY, PG_WRITERS, PG_OTHER = "postgres for the relay", "postgres for writers", "postgres"

    def __init__(self, dsn: str, relay: Proc | None, writers: Sequence[Proc]) -> None:
        self._dsn = dsn
        self._procs = {os.getpid(): self.CONSUMER, **{w.pid: self.WRITERS for w in writers}}
        if relay is not None:
            self._procs[relay.pid] = self.RELAY

    async def measure(self, start_in: float, seconds: float) -> dict[str, Any]:
        """Seconds per role from `start_in` seconds from now for `seconds` (a window that ends
        while the writers still run: their processes and sessions must be there to be read),
        and the machine's busy share of its cores."""
        await asyncio.sleep(start_in)
        conn = await asyncpg.connect(self._dsn)
        try:
            before, machine = await self._sample(conn), psutil.cpu_times()
            await asyncio.sleep(seconds)
            after, machine_after = await self._sample(conn), psutil.cpu_times()
        finally:
            await conn.close()
        used: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            used[role] = used.get(role, 0.0) + cpu - before.get(pid, (role, cpu))[1]
        total = sum(machine_after) - sum(machine)
        busy = 1 - (machine_after.idle - machine.idle) / total if total else 0.0
        return {
            "window_s": seconds,
            "cpu_seconds": {k: round(v, 3) for k, v in sorted(used.items())},
            "machine_busy_pct": round(busy * 100, 1),
        }

    async def _sample(self, conn: asyncpg.Connection) -> dict[int, tuple[str, float]]:
        rows = await conn.fetch(
            "SELECT pid, application_name, backend_type FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid()"
        )
        backends = {
            r["pid"]: self.PG_WRITERS
            if r["application_name"] == WRITER_APP
            else self.PG_RELAY
            if r["backend_type"] == "client backend"
            else self.PG_OTHER
            for r in rows
        }
        own = conn.get_server_pid()
        out: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter():
            role = self._procs.get(proc.pid) or backends.get(proc.pid) or _server_of(proc)
            if role is None or proc.pid == own:
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                out[proc.pid] = (role, float(t.user + t.system))
        return out
