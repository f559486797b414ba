"""Memory caps for benchmark processes: a memory cgroup that bounds a process *with its page cache*.

A process reading weights from disk keeps them in the kernel's page cache, which a plain RSS limit
does not see; a memory cgroup charges those pages to the process's group, so a cap below the
weights' size forces the kernel to evict them and read them from disk again. Caches are dropped
before a capped run (:func:`drop_caches`) so pages cached earlier, charged elsewhere, do not serve
the run for free.

cgroup v1 (``/sys/fs/cgroup/memory``): the group is made under the caller's own memory cgroup, so
the capped process stays inside whatever accounts for the caller. cgroup v2 (a unified hierarchy at
``/sys/fs/cgroup``): under the root, since a non-root group that holds processes cannot delegate the
memory controller. Swap is capped too (``memsw`` / ``memory.swap.max``), so the cap is real memory.

Everything here needs root; :class:`CgroupError` says so when not.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")


class CgroupError(RuntimeError):
    """A memory cgroup cannot be made, used or removed here (not root, no memory controller)."""


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise CgroupError(
            f"{what} needs root (memory cgroups and /proc/sys/vm/drop_caches); run as root or drop the cap"
        )


def drop_caches() -> None:
    """Write dirty pages back, then drop the page cache, dentries and inodes (all of the machine's)."""
    require_root("dropping the page cache")
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup at ``path`` (cgroup ``version`` 1 or 2); ``parent`` takes leftover processes."""

    path: Path
    version: int
    parent: Path

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v1 if self.version == 1 else v2)

    def add(self, pid: int) -> None:
        """Move process ``pid`` into the group (its later allocations are charged here)."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside the group (see :func:`in_cgroup`)."""
        return in_cgroup(self.path, cmd)

    def pids(self) -> list[int]:
        return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]

    def peak_bytes(self) -> int | None:
        """The most memory (page cache included) the group has held; None where the kernel does not
        say (cgroup v2 before Linux 5.19 has no ``memory.peak``)."""
        file = self._file("memory.max_usage_in_bytes", "memory.peak")
        return int(file.read_text()) if file.is_file() else None

    def oom_kills(self) -> int:
        """How many processes the cap's out-of-memory killer ended in this group."""
        file = self._file("memory.oom_control", "memory.events")
        for line in file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _locate(name: str) -> tuple[Path, int]:
    """Where a group called ``name`` goes, and the cgroup version."""
    if (CGROUP_FS / "cgroup.controllers").is_file():
        if "memory" not in (CGROUP_FS / "cgroup.controllers").read_text().split():
            raise CgroupError("this kernel's cgroup v2 hierarchy has no memory controller")
        control = CGROUP_FS / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory\n")
        return CGROUP_FS / name, 2
    root = CGROUP_FS / "memory"
    if not (root / "memory.limit_in_bytes").is_file():
        raise CgroupError(f"no memory cgroup controller here (neither {CGROUP_FS}/cgroup.controllers nor {root})")
    own = next(
        (
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":", 2)[1].split(",")
        ),
        "/",
    )
    return root / own.lstrip("/") / name, 1


@contextmanager
def memory_cgroup(name: str, limit_bytes: int) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup capped at ``limit_bytes`` (page cache included, no swap), removed on
    exit however the block ends: processes still in it are moved to its parent first.

    Raises :class:`CgroupError` when not root, without a memory controller, or when a group of that
    name is left over from an earlier run (remove it with ``rmdir`` once it holds no process)."""
    require_root("a memory cap")
    if limit_bytes <= 0:
        raise ValueError(f"a memory cap must be positive, got {limit_bytes} bytes")
    path, version = _locate(name)
    try:
        path.mkdir()
    except FileExistsError:
        raise CgroupError(f"the cgroup {path} already exists (a leftover of an earlier run?); rmdir it") from None
    group = MemoryCgroup(path, version, path.parent)
    try:
        if version == 1:
            (path / "memory.limit_in_bytes").write_text(f"{limit_bytes}\n")
            memsw = path / "memory.memsw.limit_in_bytes"  # absent where swap accounting is off
            if memsw.is_file():
                memsw.write_text(f"{limit_bytes}\n")
        else:
            (path / "memory.max").write_text(f"{limit_bytes}\n")
            (path / "memory.swap.max").write_text("0\n")
        yield group
    finally:
        _remove(group)


def _remove(group: MemoryCgroup, timeout: float = 10.0) -> None:
    """Move leftover processes to the parent and remove the group; a process that just exited
    can hold the directory busy for a moment, so this retries until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for pid in group.pids():
                try:
                    (group.parent / "cgroup.procs").write_text(f"{pid}\n")
                except ProcessLookupError:  # it exited meanwhile
                    pass
            group.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY: a process is still leaving
            if time.monotonic() > deadline:
                raise CgroupError(f"could not remove the cgroup {group.path}: {exc}") from None
            time.sleep(0.05)


def in_cgroup(group: Path, cmd: list[str]) -> list[str]:
    """``cmd`` behind a shell that enters the cgroup directory ``group`` (of any controller), then
    executes ``cmd`` in its place, so everything ``cmd`` does counts there from its first
    instruction (and no ``preexec_fn`` runs in a possibly threaded caller)."""
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *cmd]


def run_capped(cmd: list[str], group: MemoryCgroup, timeout: float, **popen) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside ``group`` (:meth:`MemoryCgroup.command`) and wait for it. On timeout
    (``TimeoutExpired``), or anything else that ends the wait (Ctrl-C), the process is killed
    before the exception goes on."""
    with subprocess.Popen(group.command(cmd), **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
