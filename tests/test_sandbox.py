"""Hostile programs against rlsys.sandbox: each asserts the status AND that the host is unharmed.

These tests require bubblewrap (`apt-get install -y bubblewrap`); the Makefile installs it.
Timeouts are kept short (1-2 s) so the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import rlsys.sandbox as sandbox
from rlsys.sandbox import SandboxResult, SandboxUnavailable, run_python

REPO = Path(__file__).resolve().parents[1]
HOST_TMP = Path("/tmp")
# Host uids a sandbox may run as, captured at import (tests shrink HOST_UID_SLOTS). 65534 stays
# in so that a regression to the old shared ``nobody`` is still caught by the host checks.
SANDBOX_HOST_UIDS = frozenset(
    [
        sandbox.SANDBOX_UID,
        *range(sandbox.HOST_UID_BASE, sandbox.HOST_UID_BASE + sandbox.HOST_UID_SLOTS),
    ]
)


def _sandbox_procs(marker: str | None = None) -> list[psutil.Process]:
    """Live processes of sandbox uids, or (if given) whose command line holds ``marker``."""
    found = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            uids = p.info["uids"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if marker is not None:
            if marker in cmdline and p.pid != os.getpid():
                found.append(p)
        elif uids is not None and uids.real in SANDBOX_HOST_UIDS:
            found.append(p)
    return found


def _assert_gone(marker: str, timeout: float = 3.0) -> None:
    # The kernel tears the pid namespace down asynchronously after bwrap dies; give it a moment.
    deadline = time.monotonic() + timeout
    while _sandbox_procs(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_procs(marker) == []


def _sandbox_owned_tmp_entries() -> set[str]:
    out = set()
    for entry in HOST_TMP.iterdir():
        try:
            if entry.lstat().st_uid in SANDBOX_HOST_UIDS:
                out.add(entry.name)
        except FileNotFoundError:
            continue
    return out


@pytest.fixture(autouse=True)
def host_unaffected():
    """Every test: no sandbox-owned files appear in the host's /tmp, no sandbox process
    survives, and the host can still start processes."""
    before = _sandbox_owned_tmp_entries()
    yield
    assert _sandbox_owned_tmp_entries() - before == set()
    _assert_gone(sandbox.PROGRAM_PATH)
    assert subprocess.run(["true"], timeout=10).returncode == 0


def _marker() -> str:
    return f"rlsys-sbx-{uuid.uuid4().hex}"


def run(code: str, **kw) -> SandboxResult:
    return run_python(code, **kw)


def assert_blocked(attempt: str, setup: str = "") -> None:
    """Run `attempt` inside `try:` in the sandbox and assert it raised OSError (never printed
    ESCAPED), with the program itself exiting normally."""
    code = (f"{setup}try:\n{textwrap.indent(attempt, '    ')}\n    print('ESCAPED')\n"
            "except OSError as e:\n    print('BLOCKED', e)\n")
    r = run(code)
    assert r.status == "ok" and r.stdout.startswith("BLOCKED"), r


# --- resource exhaustion ------------------------------------------------------------------


def test_fork_bomb_is_contained():
    marker = _marker()
    # Every descendant re-execs with the marker in argv, so survivors are easy to find.
    bomb = "import os\\nwhile True:\\n    try: os.fork()\\n    except OSError: pass"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', '{bomb}', '{marker}'])"
    r = run(code, timeout_s=2.0)
    assert r.status in ("timeout", "killed")
    _assert_gone(marker)


def test_nproc_limit_stops_forking():
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    print('LIMITED', n)\n"
    )
    r = run(code, timeout_s=3.0)
    assert r.status == "ok", r
    assert r.stdout.startswith("LIMITED")
    assert int(r.stdout.split()[1]) < sandbox.DEFAULT_NPROC


def test_memory_bomb_is_killed():
    rss = psutil.Process().memory_info().rss
    r = run("x = bytearray(2 * 1024**3)\nprint('ALLOCATED')", memory_mb=256)
    assert r.status == "killed" and r.returncode == 1
    assert "MemoryError" in r.stderr and "ALLOCATED" not in r.stdout
    assert psutil.Process().memory_info().rss - rss < 100 * 2**20


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout_s=1.0)
    assert r.status == "timeout" and r.returncode is None
    assert time.monotonic() - t0 < 3.0


def test_multithreaded_cpu_burn_hits_cpu_limit_or_timeout():
    code = (
        "import threading\n"
        "def burn():\n    while True: pass\n"
        "for _ in range(4): threading.Thread(target=burn).start()\n"
    )
    r = run(code, timeout_s=1.0)
    assert r.status in ("timeout", "killed")


def test_sleep_past_deadline_times_out():
    t0 = time.monotonic()
    r = run("import time\nprint('start', flush=True)\ntime.sleep(30)", timeout_s=1.0)
    assert r.status == "timeout"
    assert r.stdout == "start\n"  # output produced before the deadline is kept
    assert time.monotonic() - t0 < 3.0


def test_sleep_within_limits_is_ok():
    r = run("import time\ntime.sleep(0.2)\nprint('done')", timeout_s=2.0)
    assert r.status == "ok" and r.stdout == "done\n"
    assert r.elapsed_s >= 0.2


def test_huge_stdout_is_capped_and_host_memory_bounded():
    rss = psutil.Process().memory_info().rss
    r = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=1.5)
    assert r.status == "timeout"
    assert r.stdout_truncated and not r.stderr_truncated
    assert len(r.stdout) == sandbox.DEFAULT_OUTPUT_CAP
    assert psutil.Process().memory_info().rss - rss < 50 * 2**20


def test_huge_stderr_is_capped_and_host_memory_bounded():
    rss = psutil.Process().memory_info().rss
    code = "import sys\nfor _ in range(20000):\n    sys.stderr.write('e' * 65536)\nprint('end')"
    r = run(code, timeout_s=5.0)
    assert r.status in ("ok", "timeout")
    assert r.stderr_truncated and len(r.stderr) == sandbox.DEFAULT_OUTPUT_CAP
    assert psutil.Process().memory_info().rss - rss < 50 * 2**20


def test_recursion_error_is_error():
    r = run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == "error" and r.returncode == 1
    assert "RecursionError" in r.stderr


def test_unbounded_recursion_with_raised_limit_does_not_hurt_host():
    code = "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)"
    # Unwinding a million frames takes 5-9 s on a loaded 2-core box; the deadline must not be
    # what ends it.
    r = run(code, timeout_s=30.0, memory_mb=256)
    assert r.status in ("error", "killed")


def test_huge_file_hits_fsize_limit_and_nothing_reaches_host():
    name = _marker()
    code = (
        f"f = open('{name}', 'wb')\nfor _ in range(64):\n    f.write(b'x' * 2**20)\nprint('WROTE')"
    )
    r = run(code)
    # Python ignores SIGXFSZ, so the limit surfaces as EFBIG, which is reported as "killed".
    assert r.status == "killed" and r.returncode == 1, r
    assert "File too large" in r.stderr
    assert "WROTE" not in r.stdout
    assert not (HOST_TMP / name).exists() and not (REPO / name).exists()


def test_too_many_open_files_fails():
    code = (
        "fs = []\n"
        "try:\n"
        "    for _ in range(500): fs.append(open('/dev/null'))\n"
        "    print('ESCAPED')\n"
        "except OSError as e:\n"
        "    print('BLOCKED', len(fs), e.errno)\n"
    )
    r = run(code)
    assert r.status == "ok" and r.stdout.startswith("BLOCKED")
    assert int(r.stdout.split()[1]) < sandbox.DEFAULT_NOFILE


# --- exits and signals ---------------------------------------------------------------------


def test_os_exit_code_is_error():
    r = run("import os\nos._exit(3)")
    assert r.status == "error" and r.returncode == 3


def test_sigkill_self_is_killed():
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert r.status == "killed" and r.returncode == -9


def test_segfault_via_ctypes_is_killed():
    r = run("import ctypes\nctypes.string_at(0)")
    assert r.status == "killed" and r.returncode == -11


def test_killing_the_parent_does_not_escape():
    marker = _marker()
    code = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
        "try:\n    os.kill(os.getppid(), 9)\nexcept OSError as e:\n    print('kill failed', e)\n"
        "time.sleep(30)\n"
    )
    r = run(code, timeout_s=1.0)
    assert r.status == "timeout"
    _assert_gone(marker)


def test_double_forked_setsid_grandchild_is_killed():
    marker = _marker()
    code = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.closerange(0, 3)\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)',"
        f" '{marker}'])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print('parent done')\n"
    )
    r = run(code, timeout_s=3.0)
    assert r.status == "ok" and r.stdout == "parent done\n"
    _assert_gone(marker)


# --- filesystem ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/usr", "/etc", "/root", str(REPO), "/", "/prog"])
def test_writing_outside_work_dir_fails(target):
    name = _marker()
    path = f"{target.rstrip('/')}/{name}"
    assert_blocked(f"open('{path}', 'w').write('x')")
    assert not Path(path).exists()


@pytest.mark.parametrize(
    "path", ["/etc/shadow", "/root/.bashrc", str(REPO / "ruff.toml"), "/etc/passwd", "/home"]
)
def test_reading_host_secrets_fails(path):
    assert_blocked(f"print(os.listdir('{path}') if os.path.isdir('{path}') "
                   f"else open('{path}').read()[:20])", setup="import os\n")


def test_files_are_visible_in_work_dir_and_importable():
    files = {"helper.py": "VALUE = 41\n", "data/input.txt": "hello"}
    code = (
        "import os, helper\n"
        "print(os.getcwd(), sorted(os.listdir('.')), open('data/input.txt').read(), "
        "helper.VALUE + 1)\n"
    )
    r = run(code, files=files)
    assert r.status == "ok", r
    assert r.stdout == "/tmp ['data', 'helper.py'] hello 42\n"


def test_bad_file_names_are_rejected():
    for bad in ("../escape.txt", "/etc/x", "a/../../b", ""):
        with pytest.raises(ValueError):
            run("print(1)", files={bad: "x"})


def test_work_dir_does_not_leak_between_runs():
    first = run("open('leak.txt', 'w').write('secret')\nimport os\nprint(os.listdir('.'))")
    assert first.status == "ok" and first.stdout == "['leak.txt']\n"
    second = run("import os\nprint(os.listdir('.'), os.listdir('/dev/shm'))")
    assert second.status == "ok" and second.stdout == "[] []\n"


def test_work_dir_size_is_capped():
    assert_blocked("for i in range(100): open(f'f{i}', 'wb').write(b'x' * 10 * 2**20)")


# --- processes, environment, identity --------------------------------------------------------


def test_proc_shows_only_sandbox_pids():
    code = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    r = run(code)
    assert r.status == "ok"
    pids = json.loads(r.stdout)
    assert os.getpid() not in pids or os.getpid() <= 3
    assert len(pids) <= 3 and max(pids) <= 10


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLSYS_FAKE_SECRET", "hunter2-do-not-leak")
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for p in os.listdir('/proc'):\n"
        "    try: print(open(f'/proc/{p}/environ', 'rb').read())\n"
        "    except OSError: pass\n"
    )
    r = run(code)
    assert r.status == "ok"
    assert "hunter2" not in r.stdout and "RLSYS_FAKE_SECRET" not in r.stdout


def test_runs_as_unprivileged_user():
    # 65534 inside; the host uid behind it is checked from the host side further up.
    r = run("import os\nprint(os.getuid(), os.geteuid(), os.getgid())")
    assert r.status == "ok" and r.stdout == "65534 65534 65534\n"


# --- concurrent sandboxes: one host uid each ------------------------------------------------


def _in_thread(fn: Callable[[], SandboxResult]) -> tuple[threading.Thread, list[SandboxResult]]:
    out: list[SandboxResult] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _wait_for_procs(marker: str, n: int, timeout: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while len(procs := _sandbox_procs(marker)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return procs


def _exec_with_marker(code: str, marker: str) -> str:
    """A program that re-execs python3 -c ``code`` with ``marker`` in its argv, so the host can
    find it (and everything it forks) by command line."""
    return (
        f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {code!r}, {marker!r}])\n"
    )


def _kill_sandbox_program(marker: str) -> None:
    """SIGKILL the sandbox's own program (the marker process whose parent is none); bwrap then
    ends the run, and the kernel takes down whatever else it forked."""
    procs = _sandbox_procs(marker)
    pids = {p.pid for p in procs}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.ppid() not in pids:
                p.kill()


def test_claim_host_uid_is_exclusive_between_threads():
    n = 8
    held = threading.Barrier(n)
    uids: list[int | None] = []

    def claim() -> None:
        with sandbox.claim_host_uid(time.monotonic() + 5) as uid:
            uids.append(uid)
            held.wait(timeout=10)  # every thread holds its uid at the same time

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(uids) == n and None not in uids and len(set(uids)) == n
    assert set(uids) <= SANDBOX_HOST_UIDS - {sandbox.SANDBOX_UID}


def test_concurrent_sandboxes_run_as_distinct_host_uids():
    """Checked from the host: the uid inside is always 65534, so only the host side can tell."""
    markers = [_marker(), _marker()]
    runs = [
        _in_thread(
            lambda m=m: run(_exec_with_marker("import time; time.sleep(30)", m), timeout_s=15.0)
        )
        for m in markers
    ]
    ids = []
    try:
        for m in markers:
            procs = _wait_for_procs(m, 1)
            assert len(procs) == 1, f"sandbox {m} did not start"
            ids.append((tuple(procs[0].uids()), tuple(procs[0].gids())))
    finally:
        for m in markers:
            _kill_sandbox_program(m)
        for thread, _ in runs:
            thread.join(timeout=20)
    (uids_a, gids_a), (uids_b, gids_b) = ids
    # real, effective and saved ids are all the slot's uid, and the gid is the same number
    assert len(set(uids_a)) == 1 and uids_a == gids_a, ids
    assert len(set(uids_b)) == 1 and uids_b == gids_b, ids
    assert uids_a[0] != uids_b[0], ids
    assert {uids_a[0], uids_b[0]} <= SANDBOX_HOST_UIDS - {sandbox.SANDBOX_UID}, ids
    assert [r[0].status for _, r in runs] == ["killed", "killed"]
    for m in markers:
        _assert_gone(m)


def test_fork_bomb_does_not_starve_a_concurrent_sandbox():
    """A sandbox that forks 20 children succeeds while another sandbox's fork bomb is at its
    process limit.

    Where the two would share a host uid, they would share a process budget: on kernels before
    5.14 RLIMIT_NPROC itself counts every process of the host uid; since 5.14 that limit is
    counted per user namespace (so per sandbox), but every fork is also checked against the
    launcher's own RLIMIT_NPROC, counted over all processes of the host uid. This test lowers
    the launcher's limit (root itself is exempt) to DEFAULT_NPROC + 16, which one sandbox never
    reaches but a fork bomb plus the innocent sandbox sharing a uid would, so the test fails
    with a shared uid on any kernel.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (sandbox.DEFAULT_NPROC + 16, hard))
    marker = _marker()
    # Sleeps when fork fails, so that the bomb holds its processes without starving the CPU.
    bomb = (
        "import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.05)\n"
    )
    innocent = (
        "import subprocess\n"
        "kids = [subprocess.Popen(['/usr/bin/sleep', '0.5']) for _ in range(20)]\n"
        "print('exit codes', sum(k.wait() for k in kids))\n"
    )
    saturated = sandbox.DEFAULT_NPROC - 8
    try:
        thread, bomb_result = _in_thread(
            lambda: run(_exec_with_marker(bomb, marker), timeout_s=20.0)
        )
        try:
            assert len(_wait_for_procs(marker, saturated)) >= saturated, "bomb did not ramp up"
            r = run(innocent, timeout_s=10.0)
            still_running = len(_sandbox_procs(marker))
        finally:
            _kill_sandbox_program(marker)
            thread.join(timeout=30)
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    assert r.status == "ok" and r.stdout == "exit codes 0\n", r
    assert still_running >= saturated, "the bomb ended before the innocent run did"
    assert bomb_result and bomb_result[0].status == "killed"
    _assert_gone(marker)


def test_uid_slots_are_shared_across_processes_and_freed_when_the_holder_dies(monkeypatch):
    monkeypatch.setattr(sandbox, "HOST_UID_SLOTS", 2)
    # Another process takes both slots, the way a second Ray actor on the host would.
    hold = (
        "import contextlib, time\n"
        "import rlsys.sandbox as s\n"
        "s.HOST_UID_SLOTS = 2\n"
        "stack = contextlib.ExitStack()\n"
        "uids = [stack.enter_context(s.claim_host_uid(time.monotonic() + 10)) for _ in range(2)]\n"
        "print(*sorted(uids), flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout is not None
        held = holder.stdout.readline().split()
        assert held == [str(sandbox.HOST_UID_BASE), str(sandbox.HOST_UID_BASE + 1)]
        t0 = time.monotonic()
        r = run("print(1)", timeout_s=0.5)
        waited = time.monotonic() - t0
        assert r.status == "sandbox_error" and "no free sandbox uid" in r.stderr, r
        assert 0.5 <= waited < 3.0
    finally:
        holder.kill()  # SIGKILL: the kernel, not the holder, has to free its slots
        holder.wait()
    r = run("print(1)", timeout_s=5.0)
    assert r.status == "ok" and r.stdout == "1\n", r


# --- network ---------------------------------------------------------------------------------


def _listener(host: str) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(8)
    srv.settimeout(0.3)
    return srv


def _no_connection(srv: socket.socket) -> bool:
    try:
        srv.accept()
    except TimeoutError:
        return True
    return False


def _assert_connect_blocked(host: str, port: int) -> None:
    assert_blocked(f"socket.create_connection(('{host}', {port}), timeout=1)",
                   setup="import socket\n")


def test_tcp_to_host_loopback_listener_fails():
    with _listener("127.0.0.1") as srv:
        _assert_connect_blocked("127.0.0.1", srv.getsockname()[1])
        assert _no_connection(srv)


def _host_ipv4() -> str:
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127.") and name != "lo":
                return a.address
    return "192.0.2.2"  # no external interface: any non-loopback address tests the same thing


def test_tcp_to_host_external_address_fails():
    with _listener("0.0.0.0") as srv:
        _assert_connect_blocked(_host_ipv4(), srv.getsockname()[1])
        assert _no_connection(srv)


def test_udp_send_fails():
    assert_blocked("s.sendto(b'x', ('8.8.8.8', 53))",
                   setup="import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n")


def test_dns_resolution_fails():
    assert_blocked("socket.getaddrinfo('example.com', 80)", setup="import socket\n")


# --- normal behaviour, API, CLI ----------------------------------------------------------------


def test_stdin_to_stdout_roundtrip_exact():
    code = "import sys\nnums = [int(x) for x in sys.stdin.read().split()]\nprint(sum(nums))"
    r = run(code, stdin="1 2 3\n4\n")
    assert r.status == "ok" and r.returncode == 0
    assert r.stdout == "10\n" and r.stderr == ""
    assert not r.stdout_truncated and not r.stderr_truncated


def test_large_stdin_does_not_deadlock():
    data = "x" * (2 * 2**20)
    r = run("import sys\nprint(len(sys.stdin.read()))", stdin=data)
    assert r.status == "ok" and r.stdout == f"{len(data)}\n"


def test_exception_is_error():
    r = run("raise ValueError('boom')")
    assert r.status == "error" and r.returncode == 1 and "ValueError: boom" in r.stderr


def test_sandbox_setup_failure_is_sandbox_error(monkeypatch):
    monkeypatch.setattr(
        sandbox, "_root_binds", lambda: ["--ro-bind", "/nonexistent-rlsys-path", "/usr"]
    )
    r = run("print(1)")
    assert r.status == "sandbox_error" and "bwrap" in r.stderr


def test_missing_bwrap_raises_with_install_hint(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap") as info:
        run("print(1)")
    assert isinstance(info.value, RuntimeError) and "`bubblewrap`" in str(info.value)


def test_unsafe_local_runs_with_warning(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    before = set(os.listdir(HOST_TMP))
    with caplog.at_level(logging.WARNING, logger="rlsys.sandbox"):
        r = run_python("print(open('a.txt').read())", files={"a.txt": "A"}, unsafe_local=True)
    assert r.status == "ok" and r.stdout == "A\n"
    assert any("WITHOUT isolation" in m for m in caplog.messages)
    leftover = {n for n in set(os.listdir(HOST_TMP)) - before if n.startswith("rlsys-unsafe")}
    assert leftover == set()


def test_cli_prints_json(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("print('hi from cli')\n")
    out = subprocess.run(
        [sys.executable, "-m", "rlsys.sandbox", str(prog), "--timeout", "3", "--memory-mb", "256"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    result = json.loads(out.stdout)
    assert out.returncode == 0
    assert result["status"] == "ok" and result["stdout"] == "hi from cli\n"


def test_command_line_has_the_isolation_flags():
    cmd = sandbox.build_command("bwrap", 3, {}, 5.0, 512)
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in cmd
    joined = " ".join(cmd)
    assert "/root" not in joined and "/work" not in joined and "/home" not in joined
    assert "--as=536870912" in joined and "--cpu=6" in joined and "--core=0" in joined
