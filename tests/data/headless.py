"""Headless Chromium renders of the HTML reports (`lvita stats --html`, `lvita show --html`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
"""Debian's chromium (the tests that need it are skipped without it)."""
SIZE = (1200, 2000)
"""Window of the screenshot: width, height."""


def screenshot(html: Path, work: Path) -> np.ndarray:
    """`html` rendered by headless Chromium: int32 RGB pixels [2000, 1200, 3]."""
    shot = work / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={work / 'profile'}",
        f"--screenshot={shot}",
        f"--window-size={SIZE[0]},{SIZE[1]}",
        html.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    return np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
