"""A throwaway Kafka broker for chaos tests: its own ports, config and data directory.

The shared broker of scripts/services.sh (127.0.0.1:9092) is never stopped or reconfigured by
tests; tests that restart a broker, or need other broker settings (auto-create off), start one
of these from the same jars, on loopback only, and stop it at the end. The config follows
`kafka_write_config` in scripts/services.sh (KRaft, broker and controller in one process).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / ".services"
KAFKA_LIBS = SERVICES / "kafka" / "libs"


def kafka_available() -> bool:
    """Whether the jars of scripts/services.sh and a java binary are there."""
    return KAFKA_LIBS.is_dir() and shutil.which("java") is not None


def api_versions_ok(port: int, timeout: float = 2.0) -> bool:
    """A real protocol check: ApiVersions v0 (correlation id 7) answered with error code 0."""
    request = struct.pack(">hhih", 18, 0, 7, 2) + b"ob"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = b""
            while len(head) < 10:
                chunk = sock.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    _, correlation, error = struct.unpack(">iih", head)
    return bool(correlation == 7 and error == 0)


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def free_port_run(count: int, start: int) -> int:
    """A port p such that p .. p + count - 1 are all free on loopback."""
    for port in range(start, start + 100 * count, count):
        with contextlib.ExitStack() as stack:
            try:
                for p in range(port, port + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no {count} free ports in a row from {start}")


class KafkaBroker:
    """One KRaft broker+controller process on 127.0.0.1:`port` (controller on `port` + 1).

    `listeners`: more listeners, security protocol (also the listener's name: SSL,
    SASL_PLAINTEXT, SASL_SSL) -> port; their settings go in `settings`, under
    `listener.name.<name lower-case>.`. `scram`: SCRAM credentials written at format time, as
    `kafka-storage format --add-scram` takes them: `SCRAM-SHA-256=[name=alice,password=...]`.
    The brokers talk among themselves over PLAINTEXT on `port`."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        auto_create: bool = True,
        settings: Mapping[str, str] | None = None,
        listeners: Mapping[str, int] | None = None,
        scram: Sequence[str] = (),
        cluster_id: str | None = None,
    ) -> None:
        self.port = port
        self.cluster_id = (
            cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        )
        self.controller_port = port + 1
        self.listeners = dict(listeners or {})
        self._scram = list(scram)
        self.bootstrap = f"127.0.0.1:{port}"
        self.dir = SERVICES / f"kafka-{name}-{port}-{os.getpid()}"
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.out = self.dir / "kafka.out"
        self._settings = {
            "auto.create.topics.enable": "true" if auto_create else "false",
            **(settings or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> float:
        """Start the broker (formatting its storage the first time); wait until it serves.
        Returns the seconds it took."""
        t0 = time.monotonic()
        if self.running:
            return 0.0
        for p in (self.port, self.controller_port, *self.listeners.values()):
            if port_open(p):
                raise RuntimeError(f"port {p} is taken: not starting the test broker there")
        if not (self.data / "meta.properties").exists():
            self.format_storage()
        else:
            self._write_config()
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.out, "ab") as out:
            self._proc = subprocess.Popen(
                [
                    "java",
                    "-Xms128m",
                    "-Xmx512m",
                    "-XX:+UseSerialGC",
                    "-XX:TieredStopAtLevel=1",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                    f"-Dkafka.logs.dir={self.dir}",
                    "-cp",
                    f"{KAFKA_LIBS}/*",
                    "kafka.Kafka",
                    str(self.dir / "server.properties"),
                ],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = t0 + timeout
        started = False
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"test broker exited at startup: {self._tail()}")
            if not started:
                started = "Kafka Server started" in self._log_since(offset)
            if started and api_versions_ok(self.port):
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"test broker not ready within {timeout}s: {self._tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM (a controlled shutdown, as scripts/services.sh stop), SIGKILL after
        `timeout`. Returns the seconds until the process was gone."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> float:
        return self._signal(signal.SIGKILL, 10.0)

    def cleanup(self) -> None:
        """Stop the broker and delete its directory."""
        with contextlib.suppress(Exception):
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    # -- internals ---------------------------------------------------------------------------

    def _signal(self, sig: signal.Signals, timeout: float) -> float:
        t0 = time.monotonic()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return 0.0
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
        return time.monotonic() - t0

    def _write_config(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        extra = "".join(f",{name}://127.0.0.1:{port}" for name, port in self.listeners.items())
        protocols = "".join(f",{name}:{name}" for name in self.listeners)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
                + extra
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}" + extra,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT" + protocols
            ),
            "log.dirs": str(self.data),
            "num.partitions": "3",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "delete.topic.enable": "true",
            "log.index.size.max.bytes": "1048576",
            **self._settings,
        }
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (self.dir / "server.properties").write_text(text)
        (self.dir / "log4j2.properties").write_text(
            "status = warn\n"
            "name = outbox-test-kafka\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.log}\n"
            "appender.file.append = true\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
            "logger.started.name = kafka.server.KafkaRaftServer\n"
            "logger.started.level = INFO\n"
        )

    def format_storage(self) -> None:
        """Write the config and format the data dir with `cluster_id`."""
        self._write_config()
        done = subprocess.run(
            [
                "java",
                "-Xms64m",
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "-cp",
                f"{KAFKA_LIBS}/*",
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                f"--cluster-id={self.cluster_id}",  # "=": an id may start with "-"
                "-c",
                str(self.dir / "server.properties"),
                *(arg for credential in self._scram for arg in ("--add-scram", credential)),
            ],
            cwd=self.dir,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {done.stdout!r} {done.stderr!r}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self) -> str:
        parts = []
        for path in (self.out, self.log):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)
