"""`lvita train CONFIG --nproc-per-node N`: N training ranks on this machine, one command.

The ranks are started by torch's elastic agent (`torch.distributed.launcher.api.elastic_launch`,
what ``torchrun --standalone --nproc-per-node N`` uses: a c10d rendezvous on a free local port,
no restarts), each running ``python -m pipelines train CONFIG ...`` with ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set, so a rank is exactly
what torchrun would start. What lvita adds is how the run ends:

- Ctrl-C or SIGTERM: the terminal's SIGINT reaches every rank of the foreground process group,
  the agent passes the signal it got on to the ranks and waits for them (checkpoints are written
  atomically: the last complete one stays), then raises `SignalException`, which becomes the
  command's own interrupt: one line with the command that goes on, exit 130 / 143. The ranks
  stay silent (`QUIET_RANK_ENV`) and the agent's own warnings are not shown.
- Before any rank starts, the launcher makes the checks each rank makes before step 1 (config,
  model, layout for N ranks, every shard of the build present with its size): one message, not
  N. A rank that fails later has printed its one-line error; the command exits with that rank's
  code (the first to fail), adding one line only when the rank died without a documented exit
  code (killed by a signal, a crash). The agent's own logging is silenced.

Under plain ``torchrun`` the ranks behave as before, rank 0 alone printing the interrupt line
(torchrun itself then prints its own `SignalException` traceback; `--nproc-per-node` avoids it).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence

QUIET_RANK_ENV = "LVITA_LAUNCHED_RANK"
"""Set for the ranks this launcher starts: their interrupt line is the launcher's to print."""


class Stopped(Exception):
    """The launcher got `signum` (SIGINT, SIGTERM, ...); the ranks have exited."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class RankFailed(Exception):
    """A rank exited with `exitcode` (negative: killed by that signal)."""

    def __init__(self, rank: int, exitcode: int) -> None:
        super().__init__(f"rank {rank} exited with code {exitcode}")
        self.rank = rank
        self.exitcode = exitcode


def launch(rank_argv: Sequence[str], nproc: int) -> None:
    """Run ``python -m pipelines {rank_argv}`` as `nproc` ranks and wait for all of them.

    Raises:
        Stopped: the launcher got a signal (Ctrl-C, SIGTERM); the ranks have exited.
        RankFailed: a rank exited with a non-zero code (the first one that did).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # each module's logger has its level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[QUIET_RANK_ENV] = "1"
    # as torchrun: N ranks of all-core BLAS threads each would oversubscribe the machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"lvita-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "pipelines", *rank_argv)
    except SignalException as error:
        raise Stopped(int(error.sigval)) from None
    except ChildFailedError as error:
        rank, failure = min(error.failures.items(), key=lambda item: item[1].timestamp)
        raise RankFailed(rank, failure.exitcode) from None
    finally:
        os.environ.pop(QUIET_RANK_ENV, None)
