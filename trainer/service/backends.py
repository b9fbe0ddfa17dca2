"""Where repair jobs run: a child process of ``serve`` (the default) or a task on a Ray cluster.

The job runner (trainer/service/jobs.py) keeps its own queue and admission (one repair per fleet at a time, the
policy's triggers); a backend only runs one command line with a log file and reports on it. Both backends run the
same ``nnoc-trainer repair`` command, which reads the quarantine and the bundle and writes its output folder by
path: on one machine nothing more is needed; on a multi-node Ray cluster the store (``--store``) and the state
folder (``--state-dir``) must be one shared path on every node (NFS, a mounted volume), as a KubeRay deployment
mounts a persistent volume into the head and worker pods.

Ray backend: each job is a Ray task (Ray Core; no dashboard or job server) asking for ``--job-cpus`` and
``--job-gpus``; Ray queues it until a node has them, the task starts the command in a process group of its own
and waits, writing the command's output to the job's log file. A cancel interrupts the task, which terminates
the process group. A task that cannot start (no node will ever have the resources), or whose worker or node
dies, ends the job as failed with Ray's reason.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


@dataclass
class Outcome:
    """How a job's command ended: its exit code, or the backend's reason it never ran to the end."""

    code: int | None
    reason: str = ""


class JobBackend(Protocol):
    """Runs a job's command; the runner polls it."""

    name: str

    def start(self, job_id: str, cmd: list[str], log_path: Path) -> Any:
        """Start (or queue) ``cmd`` with its output in ``log_path``; returns a handle."""
        ...

    def state(self, handle: Any) -> str | Outcome:
        """``"queued"``, ``"running"``, or the :class:`Outcome` once it has ended."""
        ...

    def cancel(self, handle: Any) -> None:
        """Stop it (terminate the command); its outcome follows from :meth:`state`."""
        ...

    def close(self) -> None:
        """Release the backend (a Ray connection)."""
        ...


def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM to the command's process group, SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _popen(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


class LocalBackend:
    """A child process of ``serve`` per job."""

    name = "local"

    def start(self, job_id: str, cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start the command now."""
        return _popen(cmd, log_path)

    def state(self, handle: subprocess.Popen[bytes]) -> str | Outcome:
        """Running until the process exits."""
        code = handle.poll()
        if code is None:
            return "running"
        return Outcome(code, f"killed by signal {-code}" if code < 0 else "")

    def cancel(self, handle: subprocess.Popen[bytes]) -> None:
        """Terminate its process group."""
        if handle.poll() is None:
            _terminate(handle)

    def close(self) -> None:
        """Nothing to release."""


def run_command(cmd: list[str], log_path: str) -> int:
    """The body of a Ray job task: run ``cmd`` (its output in ``log_path``) and return its exit code. A cancel
    arrives as KeyboardInterrupt: the command's process group is terminated first."""
    proc = _popen(cmd, Path(log_path))
    try:
        while True:  # short waits: Ray's cancel is raised in the task between two Python steps, not in a syscall
            try:
                return proc.wait(0.2)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        _terminate(proc)
        raise


class RayBackend:
    """Each job is a Ray task on the cluster at ``address`` (``local``: start one in this process)."""

    name = "ray"

    def __init__(self, address: str = "auto", cpus: float = 1.0, gpus: float = 0.0) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError(
                "--jobs-backend ray needs Ray: pip install 'nnoculation-edge[ray]' (or pip install ray)"
            ) from None
        self.ray, self.cpus, self.gpus = ray, cpus, gpus
        self._owned = False
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(include_dashboard=False, log_to_driver=False)
                    self._owned = True
                else:
                    ray.init(address=address, log_to_driver=False)
            except Exception as e:  # Ray raises a bare Exception when its node does not come up
                ray.shutdown()  # what did start of a local node
                what = "start a local Ray node" if address == "local" else f"reach the Ray cluster at {address!r}"
                raise ValueError(
                    f"cannot {what}: {str(e).strip().splitlines()[0][:300]} (start one with 'ray start --head', or "
                    "pass --ray-address local to start one inside serve)"
                ) from None
        self._task = ray.remote(run_command)
        log.info("repair jobs go to the Ray cluster (%s): %s", address, ray.cluster_resources())

    def start(self, job_id: str, cmd: list[str], log_path: Path) -> Any:
        """Submit the task; Ray queues it until a node has the CPUs and GPUs it asks for."""
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "name": f"repair-{job_id}", "max_retries": 0}
        return self._task.options(**options).remote(cmd, str(log_path)), log_path

    def state(self, handle: Any) -> str | Outcome:
        """Queued until the task has opened its log file; then running until the task ends."""
        ref, log_path = handle
        ready, _ = self.ray.wait([ref], timeout=0)
        if not ready:
            return "running" if Path(log_path).exists() else "queued"
        try:
            return Outcome(int(self.ray.get(ref)))
        except self.ray.exceptions.TaskCancelledError:
            return Outcome(None, "cancelled")
        except self.ray.exceptions.RayError as e:  # the worker or its node died, the task could not be scheduled
            return Outcome(None, f"Ray: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")

    def cancel(self, handle: Any) -> None:
        """Interrupt the task (its command's process group is terminated)."""
        self.ray.cancel(handle[0], force=False)

    def close(self) -> None:
        """Disconnect (and stop the cluster this process started)."""
        if self._owned:
            self.ray.shutdown()
            self._owned = False
