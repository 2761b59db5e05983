"""Docs that are generated from code must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.unit


def test_settings_table_in_operations_doc_is_current() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    doc = (ROOT / "docs" / "operations.md").read_text()
    start = doc.index("\n", doc.index("<!-- settings:start")) + 1
    assert doc[start : doc.index("<!-- settings:end")].strip() == table, (
        "docs/operations.md is stale: run scripts/settings_table.py and paste its output"
    )
