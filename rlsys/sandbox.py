"""Run untrusted Python code in a bubblewrap sandbox with resource limits.

This is a leaf module (no Ray import) so reward functions, tests and the CLI can all use it.

Isolation model (see FACTS.md, "Sandboxing untrusted code"):

* ``bwrap --unshare-all`` gives the program fresh net/pid/ipc/uts/user/cgroup namespaces, so it
  has no network at all (only a down loopback) and sees only its own processes in ``/proc``.
* Only ``/usr`` (plus the ``/bin``/``/lib``/``/lib64`` symlinks and the ld.so cache) is bound,
  read-only; the work dir ``/tmp`` is a fresh tmpfs per run, so nothing leaks between runs and
  nothing reaches the host's disk. ``/root``, ``/home``, ``/work`` and ``/etc`` are never bound.
* bwrap itself is started as an unprivileged host uid/gid rather than root. This matters because
  the kernel does not enforce RLIMIT_NPROC for the host's uid 0 — inside a user namespace mapped
  onto root a fork bomb would be unbounded. Inside the sandbox the program sees uid/gid 65534.
* Every concurrently running sandbox on the host gets a host uid of its own, from
  :data:`HOST_UID_BASE` on (see :func:`claim_host_uid`). The kernel keeps several budgets per
  host uid, so sandboxes sharing one uid would share them: RLIMIT_NPROC itself on kernels before
  5.14 (a fork bomb in one sandbox makes ``fork()`` fail in every other), on newer kernels the
  host-wide process count of the uid, which is checked against the launcher's own RLIMIT_NPROC,
  and counters such as pipe-buffer pages.
* rlimits (address space, CPU, file size, open files, processes, core) are applied with
  ``prlimit`` *inside* the sandbox right before ``python3``; doing it there avoids a
  ``preexec_fn``, which is unsafe in a multi-threaded parent such as a Ray actor.
* The wall-clock deadline is enforced by the parent: on expiry the bwrap process group is
  SIGKILLed; ``--die-with-parent`` then takes down the namespace's init, and the kernel kills
  every process left in the pid namespace (including double-forked, ``setsid()`` grandchildren).
* stdout/stderr are drained incrementally with a selector and capped, so a program printing
  gigabytes cannot exhaust the parent's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

#: Interpreter used inside the sandbox. Debian's python3, because the preinstalled pyenv Python
#: lives under /root (mode 700), which must neither be bound nor be readable by ``nobody``.
SANDBOX_PYTHON = "/usr/bin/python3"
#: uid/gid the program sees inside the sandbox (``nobody``); bwrap maps it onto the host uid.
SANDBOX_UID = 65534
SANDBOX_GID = 65534
#: First of the host uids (and gids, same numbers) sandboxes run as, one per running sandbox.
#: systemd's uid table (https://systemd.io/UIDS-GIDS/) leaves 1879048192..2147352575 unused: it
#: is above regular, dynamic, subuid (100000 + 65536*n) and nspawn container ranges and below
#: 2**31, which some tools mishandle. Using an id without any account is safe: setresuid() to a
#: bare number needs no passwd entry, bwrap and python3 under /usr are world-readable, and the
#: program and its files come in through memfds, so the uid never needs to own or open anything.
HOST_UID_BASE = 2_000_000_000
#: How many sandboxes may run at once on a host. Each may hold DEFAULT_NPROC processes, so this
#: also bounds what all sandboxes together can fork.
HOST_UID_SLOTS = 128
#: Work directory inside the sandbox (a fresh tmpfs each run).
WORKDIR = "/tmp"
#: Where the program itself is placed, read-only and outside the work dir so that the work dir
#: holds only the caller's ``files`` and whatever the program writes.
PROGRAM_PATH = "/prog/main.py"

DEFAULT_OUTPUT_CAP = 64 * 1024
DEFAULT_FSIZE_BYTES = 16 * 1024 * 1024
DEFAULT_NOFILE = 64
DEFAULT_NPROC = 64
#: Size caps of the sandbox's writable tmpfs mounts (the work dir and /dev/shm).
WORKDIR_BYTES = 64 * 1024 * 1024
SHM_BYTES = 16 * 1024 * 1024

_READ_CHUNK = 65536
#: Pause between sweeps over the slots while every one of them is taken.
_SLOT_RETRY_S = 0.02


class SandboxUnavailable(RuntimeError):
    """bubblewrap is not installed, so code cannot be run safely."""


@dataclasses.dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is one of: ``ok`` (exit 0), ``error`` (nonzero exit), ``timeout`` (wall deadline
    hit), ``killed`` (died by a signal or a resource limit) or ``sandbox_error`` (the sandbox
    itself could not start). ``returncode`` follows :mod:`subprocess`: negative for a signal.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    elapsed_s: float = 0.0


def bwrap_path() -> str | None:
    """Path of the ``bwrap`` binary, or None when bubblewrap is not installed."""
    return shutil.which("bwrap") or (
        "/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None
    )


def _check_files(files: dict[str, str]) -> None:
    """Reject file names that would land outside the work dir."""
    for name in files:
        p = PurePosixPath(name)
        if not name or p.is_absolute() or ".." in p.parts or name.endswith("/"):
            raise ValueError(
                f"sandbox file name must be a relative path inside the work dir: {name!r}"
            )


def _memfd(name: str, data: str) -> int:
    """An anonymous in-memory file holding ``data``: bwrap copies it into the sandbox, and no
    file is ever written to the host's disk."""
    # CLOEXEC: only the bwrap child gets it (via pass_fds), never processes forked by others.
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data.encode())
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _root_binds() -> list[str]:
    """Read-only binds of just what Debian's python3 needs. On merged-/usr systems /bin, /lib
    and /lib64 are symlinks into /usr, so they are recreated as symlinks rather than bound."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # The ld.so cache lets ctypes/dlopen find multiarch libraries; /etc/alternatives holds
    # symlinks some Debian binaries resolve through. Neither contains anything secret.
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--ro-bind-try", "/etc/alternatives", "/etc/alternatives"]
    return args


# Where this process starts looking for a free slot: random per process, so that several
# processes on a host do not all contend for the same first slots, then just past the last slot
# it claimed, so that this process reuses a just-released uid (whose killed processes the kernel
# may still be tearing down) last. Unlocked: a race between threads only costs a failed bind().
_next_slot = random.randrange(HOST_UID_SLOTS)


def _try_claim_any() -> tuple[int, socket.socket] | None:
    global _next_slot
    start = _next_slot % HOST_UID_SLOTS
    for i in range(HOST_UID_SLOTS):
        slot = (start + i) % HOST_UID_SLOTS
        uid = HOST_UID_BASE + slot
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0rlsys-sandbox-uid-{uid}")  # abstract namespace: no file
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # another sandbox holds this uid
                continue
            raise
        _next_slot = slot + 1
        return uid, sock
    return None


@contextlib.contextmanager
def claim_host_uid(deadline: float) -> Iterator[int | None]:
    """Hold one host uid from the sandbox range, exclusively, for the ``with`` block.

    Yields the uid, or None if every slot stayed taken until ``deadline`` (a ``time.monotonic``
    value). The lock on a slot is a bound Linux abstract-namespace unix socket: the name is
    unique across every process of the host's network namespace (Ray actors, threads), no file
    is ever created, and the kernel frees the name when the socket is closed, including when the
    holder dies. Caveats: processes in another network namespace (another container) do not see
    these names, and anyone in this one could bind them, which denies slots but can never make
    two sandboxes share a uid.
    """
    while (claimed := _try_claim_any()) is None and time.monotonic() < deadline:
        time.sleep(min(_SLOT_RETRY_S, max(deadline - time.monotonic(), 0.0)))
    if claimed is None:
        yield None
        return
    uid, sock = claimed
    try:
        yield uid
    finally:
        sock.close()


def _limit_args(timeout_s: float, memory_mb: int) -> list[str]:
    # RLIMIT_CPU is a backstop behind the wall deadline (it also catches multi-threaded burners
    # whose CPU time outruns wall time); +1 so a single-threaded loop hits the wall first.
    cpu = math.ceil(timeout_s) + 1
    return [
        f"--as={memory_mb * 1024 * 1024}",
        f"--cpu={cpu}",
        f"--fsize={DEFAULT_FSIZE_BYTES}",
        f"--nofile={DEFAULT_NOFILE}",
        f"--nproc={DEFAULT_NPROC}",
        "--core=0",
    ]


def build_command(
    bwrap: str, prog_fd: int, file_fds: dict[str, int], timeout_s: float, memory_mb: int
) -> list[str]:
    """The full bwrap command line (also used in docs/tests to show what runs)."""
    cmd = [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",  # no controlling terminal: blocks TIOCSTI injection into the host tty
        *_root_binds(),
        "--proc", "/proc",
        "--dev", "/dev",
        # tmpfs pages are host RAM not covered by RLIMIT_AS, so every writable tmpfs gets a size
        # cap; otherwise a program could fill the host's memory with files.
        "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
        "--size", str(WORKDIR_BYTES), "--tmpfs", WORKDIR,
        "--ro-bind-data", str(prog_fd), PROGRAM_PATH,
    ]  # fmt: skip
    for name, fd in file_fds.items():
        cmd += ["--file", str(fd), f"{WORKDIR}/{name}"]
    cmd += [
        # The root itself is a scratch tmpfs bwrap builds the mounts on; make it read-only too so
        # that writes anywhere but the work dir fail instead of silently landing in scratch space.
        "--remount-ro", "/",
        "--remount-ro", "/dev",  # device nodes stay usable; new files in /dev are refused
        "--chdir", WORKDIR,
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", WORKDIR,
        "--setenv", "LANG", "C.UTF-8",
        # Files passed in are importable as modules, like a script run from its own folder.
        "--setenv", "PYTHONPATH", WORKDIR,
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_GID),
        "--",
        "/usr/bin/prlimit", *_limit_args(timeout_s, memory_mb), "--",
        SANDBOX_PYTHON, PROGRAM_PATH,
    ]  # fmt: skip
    return cmd


def _classify(returncode: int, stderr: str, sandboxed: bool) -> tuple[str, int]:
    """Map an exit status to (status, returncode) with negative returncodes for signals."""
    if returncode < 0:
        return "killed", returncode
    # bwrap (as pid-namespace init) reports a child killed by signal N as exit code 128+N, like
    # a shell; so 129..192 from bwrap means "killed by a signal". A program that itself calls
    # sys.exit(137) is indistinguishable and is also reported as killed.
    if sandboxed and 128 < returncode <= 128 + 64:
        return "killed", -(returncode - 128)
    if returncode == 0:
        return "ok", 0
    # Python turns RLIMIT_AS into MemoryError and ignores SIGXFSZ (so RLIMIT_FSIZE becomes
    # EFBIG, errno 27): both end as a clean exit 1, yet they are resource limits, so report them
    # as such. (A program can fake this line; it only misreports its own result.)
    tail = stderr.rstrip().rsplit("\n", 1)[-1]
    if tail.startswith("MemoryError") or tail.startswith("OSError: [Errno 27]"):
        return "killed", returncode
    return "error", returncode


def _decode(buf: bytearray) -> str:
    return bytes(buf).decode("utf-8", errors="replace")


def run_python(
    code: str,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    files: dict[str, str] | None = None,
    *,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    unsafe_local: bool = False,
) -> SandboxResult:
    """Run ``code`` as a Python program in a fresh sandbox and return what happened.

    ``files`` maps relative paths to text written into the work dir (the program's cwd) before
    it starts. Raises :class:`SandboxUnavailable` if bubblewrap is missing, unless
    ``unsafe_local`` is set, in which case the code runs directly with rlimits only.

    While all :data:`HOST_UID_SLOTS` host uids are in use by other sandboxes, this waits up to
    ``timeout_s`` for one to free up and then returns ``sandbox_error``; the wait is not charged
    to the program, whose deadline starts once it has a uid.
    """
    files = dict(files or {})
    _check_files(files)
    bwrap = bwrap_path()
    if bwrap is None and not unsafe_local:
        raise SandboxUnavailable(
            "bubblewrap (`bwrap`) is required to run untrusted code but was not found. "
            "Install the Debian package `bubblewrap`: apt-get install -y bubblewrap "
            "(or pass unsafe_local=True to run with rlimits only, which is NOT isolated).")

    claim_start = time.monotonic()
    # Without bwrap nothing is isolated or run as another user: no per-uid budget to keep apart.
    uid_claim = (contextlib.nullcontext() if bwrap is None
                 else claim_host_uid(claim_start + timeout_s))
    scratch: list[str] = []  # host dirs to delete afterwards (unsafe_local mode only)
    with uid_claim as host_uid:
        if bwrap is not None and host_uid is None:
            return SandboxResult(
                "sandbox_error", None, "",
                f"no free sandbox uid: all {HOST_UID_SLOTS} slots stayed busy for {timeout_s}s",
                elapsed_s=time.monotonic() - claim_start,
            )  # fmt: skip
        try:
            return _run(
                code, stdin, timeout_s, memory_mb, files, output_cap, bwrap, host_uid, scratch
            )
        finally:
            for path in scratch:
                shutil.rmtree(path, ignore_errors=True)


def _run(
    code: str,
    stdin: str,
    timeout_s: float,
    memory_mb: int,
    files: dict[str, str],
    output_cap: int,
    bwrap: str | None,
    host_uid: int | None,
    scratch: list[str],
) -> SandboxResult:
    fds: list[int] = []
    start = time.monotonic()
    try:
        prog_fd = _memfd("program", code)
        fds.append(prog_fd)
        if bwrap is not None:
            file_fds = {}
            for name, content in files.items():
                file_fds[name] = _memfd("file", content)
                fds.append(file_fds[name])
            cmd = build_command(bwrap, prog_fd, file_fds, timeout_s, memory_mb)
            popen_kw: dict[str, object] = {
                "user": host_uid,
                "group": host_uid,
                "extra_groups": [],
                "env": {"PATH": "/usr/bin:/bin"},
                "cwd": "/",
            }
        else:
            logger.warning(
                "rlsys.sandbox: bwrap missing and unsafe_local=True: running untrusted code "
                "WITHOUT isolation (rlimits only)"
            )
            cmd, popen_kw = _unsafe_local_command(prog_fd, files, timeout_s, memory_mb, scratch)
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(fds),
                start_new_session=True,  # own process group, so a timeout kill gets all of it
                **popen_kw,  # type: ignore[arg-type]
            )
        except OSError as exc:
            return SandboxResult(
                "sandbox_error", None, "", f"failed to start sandbox: {exc}",
                elapsed_s=time.monotonic() - start,
            )  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)

    try:
        out, err, timed_out = _communicate(proc, stdin.encode(), start + timeout_s, output_cap)
    finally:
        _kill_group(proc)
        proc.wait()
    elapsed = time.monotonic() - start
    stdout, stderr = _decode(out[0]), _decode(err[0])
    if timed_out:
        return SandboxResult("timeout", None, stdout, stderr, out[1], err[1], elapsed)
    rc = proc.returncode
    # bwrap reports its own setup failures on stderr with a "bwrap: " prefix and exit 1, before
    # the program printed anything.
    if bwrap is not None and rc == 1 and not stdout and stderr.startswith("bwrap: "):
        return SandboxResult("sandbox_error", rc, stdout, stderr, out[1], err[1], elapsed)
    status, rc = _classify(rc, stderr, sandboxed=bwrap is not None)
    return SandboxResult(status, rc, stdout, stderr, out[1], err[1], elapsed)


def _unsafe_local_command(
    prog_fd: int, files: dict[str, str], timeout_s: float, memory_mb: int, scratch: list[str]
) -> tuple[list[str], dict[str, object]]:
    """Fallback without bwrap: a throwaway work dir and rlimits via prlimit. Not isolated."""
    import tempfile

    workdir = tempfile.mkdtemp(prefix="rlsys-unsafe-sandbox-")
    scratch.append(workdir)
    for name, content in files.items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(content)
    python = SANDBOX_PYTHON if os.path.exists(SANDBOX_PYTHON) else sys.executable
    prlimit = shutil.which("prlimit")
    limits = [prlimit, *_limit_args(timeout_s, memory_mb), "--"] if prlimit else []
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONPATH": workdir}
    return [*limits, python, f"/proc/self/fd/{prog_fd}"], {"cwd": workdir, "env": env}


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Killing bwrap's process group is enough: --die-with-parent kills the pid namespace's init,
    # and with it every process in the namespace.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _communicate(
    proc: subprocess.Popen[bytes], data: bytes, deadline: float, cap: int
) -> tuple[tuple[bytearray, bool], tuple[bytearray, bool], bool]:
    """Feed stdin and drain stdout/stderr until both close or the deadline passes.

    Unlike Popen.communicate this keeps at most ``cap`` bytes per stream (still reading, and
    discarding, the rest so the program never blocks on a full pipe) and enforces the deadline
    on the whole run.
    """
    assert proc.stdin and proc.stdout and proc.stderr
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = dict.fromkeys(bufs, False)
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    pending = memoryview(data)
    if pending:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = False
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:_READ_CHUNK]) :]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                room = cap - len(buf)
                if len(chunk) > room:
                    truncated[fd] = True
                buf += chunk[: max(room, 0)]
        if not timed_out:
            # Pipes closed; the process should be exiting. Still bound the wait by the deadline.
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
    out_fd, err_fd = bufs  # insertion order: stdout, then stderr
    return (bufs[out_fd], truncated[out_fd]), (bufs[err_fd], truncated[err_fd]), timed_out


def main(argv: list[str] | None = None) -> int:
    """Run one file (throughput: `python -m benchmarks.sandbox_throughput`)."""
    parser = argparse.ArgumentParser(description="Run a Python file in the rlsys sandbox.")
    parser.add_argument("file", help="Python file to run")
    parser.add_argument("--timeout", type=float, default=5.0, help="wall-clock limit, seconds")
    parser.add_argument("--memory-mb", type=int, default=512, help="address-space limit, MiB")
    parser.add_argument("--stdin", default=None, help="file whose contents are fed as stdin")
    args = parser.parse_args(argv)
    stdin = Path(args.stdin).read_text() if args.stdin else ""
    result = run_python(Path(args.file).read_text(), stdin=stdin, timeout_s=args.timeout,
                        memory_mb=args.memory_mb)
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
