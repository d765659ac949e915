"""Worker-process helpers shared by the planner's and the builder's process pools."""

from __future__ import annotations

import os
import threading
import time


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.1)
    os._exit(1)  # the parent died (kill -9): stop working at once instead of lingering


def watch_parent() -> None:
    """Pool initializer: end this worker within 0.1 s of its parent process dying."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
