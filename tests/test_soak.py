"""scripts/soak, short: 64 readers of mixed cached and uncached images on 4 daemons with
peer traffic and evictions; no read fails, and the daemons' open fds and RSS end where
they started (within the script's bounds). The full soak runs on demand: scripts/soak."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_a_short_soak_has_no_errors_and_no_growth() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "10"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "errors: 0;" in done.stdout
    evictions = re.search(r"(\d+) evictions", done.stdout)
    assert evictions is not None
    assert int(evictions.group(1)) > 0  # the caches were too small: images came and went
