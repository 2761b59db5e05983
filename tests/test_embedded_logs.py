"""The relay's log level when embedded in an app that does not configure structlog."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import structlog

    from outbox.relay.relay import log as relay_log  # a batch logs `batch_claimed` at debug

    app_log = structlog.get_logger("app")
    relay_log.debug("relay_debug_unconfigured")
    relay_log.info("relay_info_unconfigured")
    app_log.debug("app_debug_unconfigured")  # the app's own loggers: structlog's default
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(10))  # the app's
    relay_log.debug("relay_debug_configured")
    """
)


def test_an_unconfigured_structlog_gets_info_and_up_from_the_relay_only() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = {word for word in done.stdout.split() if word.endswith("configured")}
    assert seen == {
        "relay_info_unconfigured",
        "app_debug_unconfigured",
        "relay_debug_configured",
    }
