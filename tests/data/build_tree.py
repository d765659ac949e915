"""What a build directory holds, for byte-identity checks of builds (local, Ray, resumed)."""

from __future__ import annotations

import os
from pathlib import Path

from lvita_data.fileio import TEMP_MARKER, sha256_file


def tree(out: Path) -> dict[str, str]:
    """sha256 of every file under `out` (the build state included), by relative path."""
    return {
        str(Path(d, n).relative_to(out)): sha256_file(str(Path(d, n)))
        for d, _, names in os.walk(out)
        for n in names
    }


def temporaries(out: Path) -> list[Path]:
    """Temporary files a writer left behind under `out`."""
    return list(out.rglob(f"*{TEMP_MARKER}*"))
