"""Throwaway PostgreSQL servers for failover tests: a primary and its streaming standby.

The shared server of scripts/services.sh (127.0.0.1:5432) is never stopped or reconfigured by
these tests; a test that fails a primary over starts two of these from the same Debian
binaries, as the `postgres` user (Postgres refuses to run as root), on loopback only, with
their data under .services/, and removes them at the end. Trust authentication: nothing but
loopback reaches them, and they live for one test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / ".services"


def pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin that has initdb, pg_ctl and pg_basebackup."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name or 0))
    for path in reversed(found):
        if all((path / tool).exists() for tool in ("initdb", "pg_ctl", "pg_basebackup")):
            return path
    return None


def clusters_available() -> bool:
    """Whether throwaway servers can be started here: the binaries, and root to run them as
    the postgres user (as scripts/services.sh does)."""
    return pg_bin() is not None and os.geteuid() == 0 and shutil.which("runuser") is not None


def _as_postgres(*argv: str | Path, timeout: float = 120) -> str:
    done = subprocess.run(
        ["runuser", "-u", "postgres", "--", *map(str, argv)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stdout} {done.stderr}".strip())
    return done.stdout


class PgCluster:
    """One server on 127.0.0.1:`port`, its data in .services/pg-`name`-`port`-`pid`."""

    def __init__(self, name: str, port: int) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        self.bin = bin_dir
        self.name = name
        self.port = port
        self.dir = SERVICES / f"pg-{name}-{port}-{os.getpid()}"
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _make_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)

    def _configure(self, settings: dict[str, str]) -> None:
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "off",  # a throwaway: its durability is its peer, not its disk
            "max_connections": "50",
            "shared_buffers": "32MB",
            **settings,
        }
        conf = self.data / "postgresql.auto.conf"
        with open(conf, "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in lines.items())

    def init_primary(self, **settings: str) -> None:
        """initdb, with trust on loopback for connections and replication."""
        self._make_dir()
        _as_postgres(
            self.bin / "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth=trust",
        )
        self._configure(settings)

    def init_standby_of(self, primary: PgCluster, **settings: str) -> None:
        """A streaming standby: a base backup of `primary`, with the connection to follow it
        (`-R`), reporting itself as `name` (for synchronous_standby_names)."""
        self._make_dir()
        _as_postgres(
            self.bin / "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            self.data,
            "-X",
            "stream",
            "-R",
            "--checkpoint=fast",
            "-d",
            f"application_name={self.name}",
        )
        self._configure(settings)

    def start(self) -> None:
        _as_postgres(self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.log, "-w")

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: a crash, as when the primary's machine dies."""
        _as_postgres(self.bin / "pg_ctl", "stop", "-D", self.data, "-m", mode, "-w")

    def promote(self) -> None:
        """Make a standby the primary; returns once it accepts writes."""
        _as_postgres(self.bin / "pg_ctl", "promote", "-D", self.data, "-w")

    @property
    def running(self) -> bool:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return False
        pid = int(pid_file.read_text().split()[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def cleanup(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
