"""Run untrusted Python (model-written code) in a throwaway, resource-limited child process.

Every run, whatever the isolation level: its own session (process group), killed as a group at the end
or at the timeout; RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC (processes),
RLIMIT_CORE = 0; an empty environment with HOME and TMPDIR in a fresh directory; output to files (a
child that keeps a pipe open cannot hang the caller).

Isolation levels (`isolation()` says which this machine gets):
  "namespaces" (root, with util-linux's `unshare` and `setpriv`): new network namespace (no interface but a
      downed loopback: no network at all), new PID namespace (its first process is the program's parent;
      when it dies the kernel kills every process left inside, even ones that called setsid), new mount
      namespace with fresh tmpfs over /tmp, /var/tmp and /dev/shm (the only places the user below may write;
      they vanish with the namespace), and the program runs as user nobody (65534), so RLIMIT_NPROC applies
      (root ignores it) and file permissions keep it out of everything else.
  "audit-hook" (otherwise): the rlimits and session above, plus a `sys.addaudithook` prelude that refuses
      sockets, process creation and opening files for writing outside the working directory. An audit hook
      stops Python code, not native code (ctypes can get past it): for hostile code use a container.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

AUDIT_PRELUDE = r'''
import os as _os, sys as _sys
def _grok1_guard(event, args, _root=_os.path.realpath(_os.getcwd()), _os=_os):
    if event.startswith("socket.") or event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system",
                                                "os.exec", "subprocess.Popen", "os.kill", "os.killpg"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & 3)
        path = _os.path.realpath(_os.fsdecode(args[0]))
        if writes and not (path == _root or path.startswith(_root + _os.sep)):
            raise PermissionError(f"sandbox: writing {path} is not allowed")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
                 "os.truncate", "shutil.rmtree"):
        path = _os.path.realpath(_os.fsdecode(args[0])) if args and isinstance(args[0], (str, bytes)) else _root
        if not (path == _root or path.startswith(_root + _os.sep)):
            raise PermissionError(f"sandbox: {event} on {path} is not allowed")
_sys.addaudithook(_grok1_guard)
del _grok1_guard
'''


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    processes: int = 16  # RLIMIT_NPROC (user nobody's processes; namespaces isolation only)


@dataclass
class Result:
    status: str  # "passed" (exit 0), "failed" (non-zero exit or signal), "timeout"
    returncode: int | None
    output: str  # the last 2,000 characters of stdout + stderr
    isolation: str

    @property
    def ok(self) -> bool:
        return self.status == "passed"


@functools.cache
def nobody_python() -> str | None:
    """An interpreter user nobody can execute: ours if every directory above it is world-searchable, else the
    system's /usr/bin/python3."""
    exe = Path(os.path.realpath(sys.executable))
    if all(os.stat(p).st_mode & 0o001 for p in [exe, *exe.parents]):
        return str(exe)
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else None


@functools.cache
def isolation() -> str:
    """'namespaces' when this process can build them (root, unshare, setpriv, and a trial run succeeds),
    else 'audit-hook'."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv") \
            or nobody_python() is None:
        return "audit-hook"
    try:
        r = subprocess.run(_namespace_command("true"), stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "audit-hook"
    return "namespaces" if r.returncode == 0 else "audit-hook"


def _namespace_command(program: str) -> list[str]:
    """unshare (net, pid, mount; the forked child is PID 1 and dies with unshare) -> sh mounts private tmpfs
    dirs and makes the working dir -> setpriv drops to nobody -> `program` (a command line)."""
    script = ("set -e; for d in /tmp /var/tmp /dev/shm; do [ -d $d ] && mount -t tmpfs -o size=64m,mode=1777 tmpfs $d;"
              " done; mkdir -m 700 /tmp/sandbox; chown %d:%d /tmp/sandbox; cd /tmp/sandbox;"
              " exec setpriv --reuid %d --regid %d --clear-groups env -i HOME=/tmp/sandbox TMPDIR=/tmp/sandbox"
              " PATH=/usr/bin:/bin LANG=C.UTF-8 %s") % (NOBODY, NOBODY, NOBODY, NOBODY, program)
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "sh", "-c", script]


# Sets the limits, then becomes the command (argv[2:]). A separate interpreter rather than Popen's preexec_fn,
# which is unsafe in a process with threads (the evaluation runner scores on worker threads).
LAUNCHER = ("import os, resource, sys\n"
            "for name, value in zip(('CPU', 'AS', 'FSIZE', 'CORE', 'NPROC'), map(int, sys.argv[1].split(','))):\n"
            "    resource.setrlimit(getattr(resource, 'RLIMIT_' + name), (value, value))\n"
            "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _limited(argv: list[str], limits: Limits) -> list[str]:
    cpu = int(limits.timeout_s) + 1
    values = (cpu, limits.memory_mb << 20, limits.file_mb << 20, 0, limits.processes)
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, ",".join(map(str, values)), *argv]


def run_python(code: str, limits: Limits = Limits(), timeout_s: float | None = None) -> Result:
    """Run `code` as a Python program under `limits` (timeout_s overrides limits.timeout_s); never raises for
    anything the program does."""
    if timeout_s is not None:
        limits = Limits(timeout_s, limits.memory_mb, limits.file_mb, limits.processes)
    level = isolation()
    with tempfile.TemporaryDirectory(prefix="grok1-sandbox-") as tmp:
        out_path = Path(tmp) / "output"
        if level == "namespaces":
            # The program comes on stdin: the namespace's /tmp is a fresh tmpfs that cannot see `tmp`.
            argv, stdin, cwd, env = _namespace_command(f"{nobody_python()} -I -"), code.encode(), tmp, {}
        else:
            work = Path(tmp) / "work"
            work.mkdir()
            (work / "program.py").write_text(AUDIT_PRELUDE + code, encoding="utf-8")
            argv, stdin, cwd = [sys.executable, "-I", "program.py"], b"", str(work)
            env = {"HOME": str(work), "TMPDIR": str(work), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        with open(out_path, "wb") as out, tempfile.TemporaryFile(dir=tmp) as inp:
            inp.write(stdin)
            inp.seek(0)
            proc = subprocess.Popen(_limited(argv, limits), stdin=inp, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                    env=env, start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=limits.timeout_s)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
                except ProcessLookupError:
                    pass
                proc.wait()
        output = out_path.read_bytes()[-2000:].decode("utf-8", "replace")
    return Result(status, rc, output, level)
