"""Extras: `pip install outbox` is the writer's side only, and whatever needs an extra that is
not installed says which one, in one line. Uninstalled packages are simulated by an import
hook in a subprocess; `test_lean_install` installs the real wheel into a fresh venv."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from outbox.extras import EXTRA_OF, MissingExtraError, missing_extra, requires_extra

ROOT = Path(__file__).resolve().parent.parent

#: Runs argv[2:] as `python -m <argv[1]>` with the packages in OUTBOX_TEST_BLOCKED unimportable.
BLOCKING_RUNNER = """
import runpy, sys
from importlib.abc import MetaPathFinder

BLOCKED = set(sys.argv[1].split(","))

class Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
if sys.argv[2] == "-c":
    exec(sys.argv[3])
else:
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def without(blocked: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKING_RUNNER, blocked, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
    )


@pytest.mark.unit
def test_missing_extra_names_the_extra_and_leaves_other_modules_alone() -> None:
    retold = missing_extra(ModuleNotFoundError("x", name="aiokafka.errors"), "broker=kafka")
    assert isinstance(retold, MissingExtraError)
    assert str(retold) == (
        "broker=kafka needs aiokafka, which is not installed: pip install 'outbox[kafka]'"
    )
    other = ModuleNotFoundError("x", name="numpy")
    assert missing_extra(other, "anything") is other
    with pytest.raises(ModuleNotFoundError) as caught, requires_extra("here"):
        import outbox_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert not isinstance(caught.value, MissingExtraError)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("blocked", "args", "expected"),
    [
        ("click", ["--help"], "outbox-relay needs click, which is not installed: "),
        ("structlog", ["status"], "outbox-relay needs structlog, which is not installed: "),
        (
            "aiokafka",
            ["run", "--broker", "kafka", "--database-url", "sqlite:///x.db"],
            "broker=kafka needs aiokafka, which is not installed: pip install 'outbox[kafka]'",
        ),
        (
            "redis",
            ["run", "--broker", "redis", "--database-url", "sqlite:///x.db"],
            "broker=redis needs redis, which is not installed: pip install 'outbox[redis]'",
        ),
        (
            "aiosqlite",
            ["run", "--broker", "redis", "--database-url", "sqlite:///x.db"],
            "database_url=sqlite:// needs aiosqlite, which is not installed: "
            "pip install 'outbox[sqlite]'",
        ),
        ("redis", ["tail", "orders", "--broker", "redis"], "broker=redis needs redis"),
        ("aiokafka", ["tail", "orders", "--broker", "kafka"], "broker=kafka needs aiokafka"),
    ],
)
def test_the_cli_names_the_missing_extra_in_one_line(
    blocked: str, args: list[str], expected: str, tmp_path: Path
) -> None:
    done = without(blocked, "outbox.relay", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"outbox-relay: error: {expected}"), done.stderr
    assert "pip install 'outbox[" in done.stderr


@pytest.mark.unit
def test_the_fastapi_router_names_its_extra() -> None:
    code = (
        "from outbox.relay.fastapi import outbox_lifespan, outbox_router\n"
        "try:\n"
        "    outbox_router(outbox_lifespan())\n"
        "except ModuleNotFoundError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = without("fastapi", "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "MissingExtraError outbox_router needs fastapi, which is not installed: "
        "pip install 'outbox[fastapi]'"
    )


@pytest.mark.unit
def test_the_writer_side_imports_none_of_the_extras() -> None:
    blocked = "asyncpg,aiokafka,redis,fastapi,starlette,click,structlog,alembic,aiosqlite"
    code = (
        "import outbox\n"
        "from outbox import OutboxEvent, enqueue, Envelope, Event, Registry, inbox\n"
        "from outbox import CorrelationIdMiddleware\n"
        "event = OutboxEvent(topic='orders', key='42', payload={'total': 1})\n"
        "print(event.topic, event.key)\n"
    )
    done = without(blocked + ",prometheus_client,pydantic_settings", "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "orders 42"


@pytest.mark.unit
def test_nothing_loads_the_relay_folder_under_its_own_name() -> None:
    """In the repo, `relay/` is importable as a top-level package too (outbox/relay links to
    it); a module that did so would run twice, with two copies of every class."""
    code = (
        "import pkgutil, sys, importlib, outbox\n"
        "for m in pkgutil.walk_packages(outbox.__path__, 'outbox.'):\n"
        "    if not m.name.startswith(('outbox.migrations', 'outbox.relay.__main__')):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'relay' or n.startswith('relay.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.unit
def test_every_extra_the_readme_installs_exists_and_names_what_it_says() -> None:
    """The README's install lines name real extras (pip would only warn about a missing one),
    and `all` holds every other extra. (`tests/test_packaging.py` installs the wheel itself,
    lean and with `[relay,kafka]`.)"""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    readme = (ROOT / "README.md").read_text()
    named = re.findall(r'^pip install "outbox\[([a-z,]+)\]"', readme, re.M)
    assert len(named) >= 8
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README installs outbox[{extra}], which pyproject lacks"
    (everything,) = extras["all"]
    listed = set(everything.removeprefix("outbox[").removesuffix("]").split(","))
    assert listed == set(extras) - {"all", "dev", "bench"}
    # Each package a missing-extra error names is in the extra that error tells to install.
    for module, extra in EXTRA_OF.items():
        if module in ("starlette", "hiredis", "greenlet"):  # installed by what the extra lists
            continue
        wanted = {"opentelemetry": "opentelemetry-api"}.get(module, module.replace("_", "-"))
        assert any(re.match(rf"{wanted}\b", p) for p in extras[extra]), (module, extra)
