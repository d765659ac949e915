"""A Ray cluster of two nodes on this machine, started the way users start one, for
tests/data/test_ray_cluster.py: ``ray start --head`` and ``ray start --address=...``, each node
with its own temp dir, its own ports and 1 CPU.

Only this cluster's processes are stopped at the end: each ``ray start`` runs in a session of its
own, so every process it starts (GCS, raylet, agents and the raylet's workers) is in that
process group, and `RayCluster.stop` kills those groups plus anything naming the cluster's temp
dir. ``ray stop`` is not used: it kills every Ray process of the user on the machine (it matches
process names), other tests' and other people's included.

Ray's token authentication (on by default since Ray 2.5x) is kept on, with a token of this
cluster's own (``RAY_AUTH_TOKEN_PATH``), so ``~/.ray`` is neither read nor written.

The nodes run with ``PYTHONPATH`` = the hook directory and the repository, so their workers
import the tree under test and `HOOK`, a ``sitecustomize`` that lets a test see and slow down
the shard tasks from outside (see `HOOK`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
OBJECT_STORE_BYTES = 100 * 1024 * 1024
START_TIMEOUT_S = 120.0

HOOK = """\
# Imported at start-up by every Python process of the test's Ray cluster (PYTHONPATH); it acts
# only in Ray workers. Each `write_shard` call appends one JSON line to $LVITA_RAY_HOOK/calls.jsonl
# (shard, worker pid, Ray node id) once the shard's temporary file holds its first sample, then
# sleeps $LVITA_RAY_HOOK/delay seconds (a float; no file: no sleep), so that a test can kill
# the worker, or the driver, while shards are being written.
import sys

if sys.argv and sys.argv[0].endswith("default_worker.py"):
    import json
    import os
    import time

    import lvita_data.shards.writer as _writer

    _write_shard, _hook = _writer.write_shard, os.environ["LVITA_RAY_HOOK"]

    def _delay():
        try:
            with open(os.path.join(_hook, "delay"), encoding="utf-8") as handle:
                return float(handle.read())
        except FileNotFoundError:
            return 0.0

    def _observed(path, samples):
        import ray

        for number, sample in enumerate(samples):
            yield sample
            if number == 0:  # the temporary file exists from here on
                call = {
                    "shard": os.path.basename(path),
                    "pid": os.getpid(),
                    "node": ray.get_runtime_context().get_node_id(),
                }
                with open(os.path.join(_hook, "calls.jsonl"), "a", encoding="utf-8") as log:
                    log.write(json.dumps(call) + "\\n")
                time.sleep(_delay())

    def write_shard(path, samples, **kwargs):
        return _write_shard(path, _observed(path, samples), **kwargs)

    _writer.write_shard = write_shard
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_cli() -> str:
    """The `ray` command of this Python environment."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError(f"no `ray` command beside {sys.executable} or on PATH")
    return found


class RayCluster:
    """``RayCluster.start()``; `env` is what a driver needs (RAY_ADDRESS, the token); `stop()`."""

    def __init__(self) -> None:
        # short: Ray's Unix sockets live under it, and their paths must stay under 108 bytes
        self.root = Path(tempfile.mkdtemp(prefix="lvray-", dir="/tmp"))
        self.hook = self.root / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32), encoding="utf-8")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.groups: list[int] = []
        self.started = time.time()
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        python_path = os.pathsep.join(
            p for p in (str(self.hook), str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        self.node_env = {
            **base,
            **auth,
            "PYTHONPATH": python_path,
            "LVITA_RAY_HOOK": str(self.hook),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # a driver: `lvita build --executor ray` as a user runs it, on the tree under test
        self.env = {
            **base,
            **auth,
            "RAY_ADDRESS": self.address,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
            ),
        }

    @classmethod
    def start(cls, nodes: int = 2) -> RayCluster:
        cluster = cls()
        try:
            for number in range(nodes):
                cluster._start_node(number)
            cluster.wait_for_nodes(nodes)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_node(self, number: int) -> None:
        args = [
            ray_cli(),
            "start",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / f'node{number}'}",
            # the fixed defaults (8265, 52365, workers 10002-19999) would clash between the two
            # nodes and with any other Ray on this machine
            f"--dashboard-agent-listen-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        if number == 0:
            args += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ]
        else:
            args.append(f"--address={self.address}")
        log = self.root / f"start-node{number}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                args,
                env=self.node_env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the node's processes: one group, `stop` kills it
                cwd=self.root,
            )
        self.groups.append(process.pid)
        try:
            code = process.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            raise RuntimeError(
                f"`ray start` of node {number} failed ({code}):\n{log.read_text()[-3000:]}"
            )

    def nodes(self) -> list[dict]:
        """Ray's view of the cluster's nodes (`ray.nodes()`), from a driver of its own."""
        script = (
            "import json, ray; ray.init(log_to_driver=False); "
            "print(json.dumps([{'alive': n['Alive'], 'cpus': n['Resources'].get('CPU', 0), "
            "'id': n['NodeID']} for n in ray.nodes()])); ray.shutdown()"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ray.nodes() failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            alive = [n for n in self.nodes() if n["alive"]]
            if len(alive) == count and all(n["cpus"] == 1 for n in alive):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected {count} live nodes of 1 CPU, Ray has {alive}")
            time.sleep(1.0)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: its `ray start` process groups, and any process whose
        command line names its temp dir."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:  # a group id is reused only once its group is empty: check the age too
                in_group = os.getpgid(process.pid) in self.groups and (
                    process.create_time() >= self.started - 1
                )
                if process.status() == psutil.STATUS_ZOMBIE or process.pid == os.getpid():
                    continue
            except (OSError, psutil.Error):
                continue
            if in_group or str(self.root) in " ".join(process.info["cmdline"] or ()):
                found.append(process)
        return found

    def titled(self, prefix: str) -> list[psutil.Process]:
        """This cluster's processes whose title starts with `prefix` (a Ray worker running a
        task is titled ``ray::<task name>``)."""
        found = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                if "".join(process.cmdline()).startswith(prefix):
                    found.append(process)
        return found

    def stop(self) -> None:
        """Kill this cluster's processes (SIGKILL, as ``ray stop --force``), wait for them, and
        delete its temp dir."""
        for _ in range(3):  # a raylet may start a worker while the others are being killed
            processes = self.processes()
            if not processes:
                break
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGKILL)
            psutil.wait_procs(processes, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
