"""Work on an untrusted file in a child process that can do little harm: a network namespace of its own (no
route anywhere), an empty working folder of its own, an address-space and a CPU-time limit, a wall-clock deadline,
and, when started as root, the unprivileged ``nobody`` user. The answer comes back over a pipe as JSON, never as
pickle: a child that was subverted can send wrong numbers, not code.

The vendor's model is the adversary (DESIGN.md, trust boundaries). The door checks (:mod:`trainer.stages.suspect`)
parse, convert and run the vendor's file here first; only a file that passed them in the child is converted again
in the trainer's own process.

Each containment step the kernel refuses (no CAP_SYS_ADMIN for a network namespace, not root for a user switch) is
logged as a warning and the others still apply.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
NOBODY = 65534
MAX_ANSWER_BYTES = 1 << 20


class ContainedError(ValueError):
    """The contained work failed or ran past a limit; the message says which, for a person."""


@dataclass(frozen=True)
class Limits:
    """What the child may spend: wall-clock seconds, CPU seconds, and memory beyond what its imports take."""

    seconds: float = 600.0
    memory_bytes: int = 6 << 30


def _unshare_network() -> str | None:
    """A network namespace of its own (only a loopback, down); the reason when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return None
    return os.strerror(ctypes.get_errno())


def _code_folders() -> list[str]:
    """Where this interpreter imports from: the standard library and the installed packages."""
    return sorted({sys.base_prefix, sys.prefix, *(p for p in sys.path if p and os.path.isdir(p))})


def _open_to_others(path: str) -> bool:
    """Whether a user other than the owner can read ``path`` and reach it through every folder above it."""
    target = os.path.realpath(path)
    try:
        if not os.stat(target).st_mode & stat.S_IROTH:
            return False
        while True:
            if not os.stat(target).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(target)
            if parent == target:
                return True
            target = parent
    except OSError:
        return False


def vm_size() -> int:
    """This process's virtual memory size in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(
    conn: Connection, target: str, args: tuple[Any, ...], limits: Limits, workdir: str, imports: tuple[str, ...]
) -> None:
    """The child's whole life: contain itself, import, run ``target(*args)``, send its JSON answer."""
    notes = []
    reason = _unshare_network()
    if reason is not None:
        notes.append(f"no network namespace ({reason})")
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    module_name, _, name = target.partition(":")
    for extra in (module_name, *imports):  # before the limits: importing is ours, not the vendor's
        importlib.import_module(extra)
    fn = getattr(importlib.import_module(module_name), name)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + limits.memory_bytes,) * 2)
    cpu = int(limits.seconds * max(1, os.cpu_count() or 1)) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0:
        unreadable = next((p for p in _code_folders() if not _open_to_others(p)), None)
        if unreadable is not None:  # the libraries import lazily: as nobody they could not
            notes.append(f"the user root ({unreadable} is not readable by other users)")
        else:
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as e:
                notes.append(f"the user root ({e.strerror})")
    try:
        answer = {"ok": fn(*args), "notes": notes}
    except MemoryError:
        answer = {"error": f"ran out of memory (limit {limits.memory_bytes >> 20} MiB)", "notes": notes}
    except Exception as e:  # the vendor's file can make any library raise anything: reported, not raised
        answer = {"error": str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}", "notes": notes}
    conn.send_bytes(json.dumps(answer).encode())
    conn.close()


def run_contained(
    target: str, args: tuple[Any, ...], limits: Limits = Limits(), what: str = "work", imports: tuple[str, ...] = ()
) -> Any:
    """``target`` ("module:function") called with ``args`` in a contained child; its return value must be JSON.

    ``imports``: modules the child imports before its limits apply (libraries the target loads lazily). Raises
    :class:`ContainedError` with the target's own message when it raised, or with the limit it ran past.
    """
    ctx = multiprocessing.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="nnoc-contained-")
    if os.geteuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, target, args, limits, workdir, imports), daemon=True)
    started = time.monotonic()
    try:
        child.start()
        send.close()
        raw = b""
        if receive.poll(limits.seconds):
            try:
                raw = receive.recv_bytes(MAX_ANSWER_BYTES)
            except (EOFError, OSError):
                raw = b""
        elapsed = time.monotonic() - started
        if not raw:
            if child.is_alive():
                child.kill()
                child.join(5)
                raise ContainedError(f"{what} ran past its {limits.seconds:.0f} s limit and was stopped")
            child.join(5)
            code = child.exitcode
            if code is not None and code < 0:
                sig = signal.Signals(-code).name
                cause = "its CPU-time limit" if -code == signal.SIGXCPU else f"signal {sig}"
                raise ContainedError(f"{what} was stopped by {cause} after {elapsed:.0f} s")
            raise ContainedError(
                f"{what} ended (exit code {code}) without an answer; it may have run out of memory "
                f"(limit {limits.memory_bytes >> 20} MiB)"
            )
        child.join(5)
        if child.is_alive():
            child.kill()
        try:
            answer = json.loads(raw)
        except ValueError:
            raise ContainedError(f"{what} answered something that is not JSON") from None
        for note in answer.get("notes", []) if isinstance(answer, dict) else []:
            level = logging.INFO if str(note).startswith("the user root") else logging.WARNING
            log.log(level, "%s ran contained, but with %s", what, str(note)[:200])
        if not isinstance(answer, dict) or ("ok" not in answer and "error" not in answer):
            raise ContainedError(f"{what} answered an unexpected message")
        if "error" in answer:
            raise ContainedError(str(answer["error"])[:2000])
        return answer["ok"]
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        shutil.rmtree(workdir, ignore_errors=True)  # nothing of the child's stays behind
