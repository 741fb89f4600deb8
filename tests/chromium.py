"""Headless Chromium (Debian's `chromium` package) for the report tests: a page's DOM after the
browser parsed it, and a screenshot. A missing browser fails the test, never skips it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# Flags that keep a headless run off the network and out of the user's profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
# A guard against a hung browser, not a speed check.
BROWSER_TIMEOUT = 180


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (the report test needs a real browser)")
    return path


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                            text=True, timeout=BROWSER_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM Chromium built from `page`, serialized (what a reader's browser shows)."""
    return _run(["--dump-dom", page.resolve().as_uri()], profile).stdout


def screenshot(page: Path, out: Path, profile: Path, width: int = 1200, height: int = 2400) -> Path:
    """A PNG of the page's first width x height CSS pixels."""
    _run([f"--screenshot={out.resolve()}", f"--window-size={width},{height}", page.resolve().as_uri()], profile)
    assert out.exists() and out.stat().st_size > 0
    return out
