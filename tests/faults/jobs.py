"""Real jobs for the fault-injection tests: the entry points launched with torchrun on CPU, in
their own session, so a test can kill one rank, stop one, or kill the whole job.

Every process a job leaves behind is found by ``survivors()``: the test process is made a child
subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so a helper orphaned by a killed trainer is
re-parented to it instead of to init and shows up as its child.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants; False where the OS does not allow it."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, command line) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return int(rest[1]), rest[0], cmd


def children(pid: int | None = None) -> dict[int, str]:
    """Live (not zombie) children of ``pid`` (default: this process): pid -> command line."""
    pid = os.getpid() if pid is None else pid
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _stat(int(entry.name))
        if info and info[0] == pid and info[1] != "Z":
            found[int(entry.name)] = info[2]
    return found


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of ``pid``: pid -> command line."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, cmd in children(todo.pop()).items():
            if child not in found:
                found[child] = cmd
                todo.append(child)
    return found


def reap_zombies() -> None:
    """Collect the exit status of this process's dead children that no Popen object waits for."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info and info[0] == os.getpid() and info[1] == "Z":
                try:
                    os.waitpid(int(entry.name), os.WNOHANG)
                except ChildProcessError:
                    pass


def survivors(before: set[int], grace: float = 10.0) -> dict[int, str]:
    """Children of this process that were not there in ``before`` and are still alive after ``grace``
    seconds (a helper given time to notice its parent died)."""
    deadline = time.monotonic() + grace
    while True:
        reap_zombies()
        left = {p: c for p, c in children().items() if p not in before}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(nnodes: int, node_rank: int, port: int, script: str, *args: str) -> list[str]:
    """One node of a multi-node launch on this machine: a torchrun of one worker that meets the
    other nodes' torchruns at 127.0.0.1:``port``. Each node's agent watches only its own worker, so
    a rank killed on one node is noticed by its peers through the process groups, as across hosts."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", script, *args]


@dataclass
class Job:
    """A launched command in its own session; its output goes to ``log``."""

    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=cpu_env)
    proc: subprocess.Popen | None = None
    started: float = 0.0

    def start(self) -> Job:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True, text=True)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match:
        """Block until ``pattern`` appears in the output; fails if the job ends first or time runs out."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            m = regex.search(self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc={self.proc.returncode}) before {pattern!r}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = 600.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self._out.close()
        return rc

    def ranks(self, script: str) -> list[int]:
        """Pids of the worker processes running ``script`` (torchrun's children), by start order."""
        found = [p for p, c in descendants(self.proc.pid).items() if script in c and "torch.distributed.run" not in c]
        return sorted(found)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole job (its process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Kill what is left of the job (its group and any descendant that left it) and wait for it."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.kill(signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        if not self._out.closed:
            self._out.close()


def run(cmd: list[str], log: Path, timeout: float = 600.0, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` to its end: (exit code, output)."""
    job = Job(cmd, log, env or cpu_env()).start()
    try:
        rc = job.wait(timeout)
    except subprocess.TimeoutExpired:
        job.stop()
        raise
    return rc, job.output()
