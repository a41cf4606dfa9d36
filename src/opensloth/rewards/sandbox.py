"""Run model-written Python in a sandboxed subprocess.

Limits (defaults in `SandboxLimits`), each enforced by the operating system first and by the
child's own audit hook second (defence in depth):

- wall time: the child runs in its own session; when `wall_time_s` passes, the whole process
  group is killed with SIGKILL.
- CPU time: RLIMIT_CPU = `cpu_time_s` (SIGXCPU, then SIGKILL one second later).
- memory: RLIMIT_AS = `memory_mb` of address space (allocations beyond fail with MemoryError).
- processes: RLIMIT_NPROC = 0, so the child can neither fork nor start threads. Linux ignores
  RLIMIT_NPROC for root, so when we run as root the child is started as the unprivileged user
  `nobody` (uid/gid 65534, no supplementary groups); its working directory is the only one
  chowned to it. The audit hook also refuses os.fork/exec/spawn/system, subprocess, ctypes,
  signals to other processes and sockets.
- files: RLIMIT_FSIZE = `max_file_mb` per file; the audit hook refuses any write, rename,
  removal, link or chmod outside the working directory, opening directories outside it, and
  reading other processes' /proc entries.
- environment: nothing is inherited; env is {"PATH": "/usr/bin:/bin"}. Python runs with -I -S
  (isolated, no site-packages, no PYTHON* variables), so only the standard library imports.
- working directory: a fresh temporary directory, removed afterwards.
- output: stdout and stderr go to files (not pipes, so a chatty child cannot fill the parent's
  memory) and come back truncated to `max_output_bytes` each.

An audit hook is not a security boundary on its own (Python's docs say so); the uid switch and
the resource limits are. The sandbox protects the machine, not the reward: a program can still
inspect its own process, so treat test results as a signal, not a proof.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
SAFE_ENV = {"PATH": "/usr/bin:/bin"}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (see the module docstring for how each is enforced)."""

    wall_time_s: float = 5.0
    cpu_time_s: int = 5
    memory_mb: int = 512
    max_file_mb: int = 16
    max_output_bytes: int = 16_384


DEFAULT_LIMITS = SandboxLimits()


@dataclass
class SandboxResult:
    """What happened. status: "ok" (exit 0), "error" (non-zero exit), "timeout" (wall or CPU limit)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# Runs in the child before the user's code: limits first, then the audit hook, then the code.
# argv: cpu seconds, address-space bytes, file bytes, audit hook on (1) or off (0).
_BOOTSTRAP = r'''
import os, resource, sys
cpu, mem, fsize, hook_on = (int(a) for a in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
source = open("solution.py").read()
os.remove("solution.py")  # the program cannot read its harness back (e.g. a result token)
del cpu, mem, fsize

def _install(root, hook_on):
    if not hook_on:
        return
    realpath, isdir, fsdecode, sep = os.path.realpath, os.path.isdir, os.fsdecode, os.sep
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = frozenset((
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill",
        "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "ctypes.call_function", "sys.setprofile", "sys.settrace", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "socket.connect", "socket.bind", "socket.sendto",
        "socket.sendmsg", "os.putenv", "os.setxattr", "os.removexattr",
    ))
    blocked_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"))
    path_args = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.truncate": 1, "os.chmod": 1,
                 "os.chown": 1, "os.utime": 1, "os.chdir": 1, "os.rename": 2, "os.link": 2,
                 "os.symlink": (1,), "os.chflags": 1}

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        path = realpath(fsdecode(path))
        return path == root or path.startswith(root + sep)

    def hook(event, args):
        if event in blocked:
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "import" and args[0] in blocked_imports:
            raise ImportError("sandbox: importing " + args[0] + " is not allowed")
        if event == "open":
            path, flags = args[0], args[2]
            if isinstance(path, int) or inside(path):
                return
            name = fsdecode(path)
            if (flags or 0) & writes or isdir(name):
                raise PermissionError("sandbox: writing outside the working directory is not allowed: " + name)
            if realpath(name).startswith("/proc/") and not name.startswith("/proc/self/"):
                raise PermissionError("sandbox: reading " + name + " is not allowed")
        elif event in path_args:
            spec = path_args[event]
            checked = (args[i] for i in spec) if isinstance(spec, tuple) else args[:spec]
            for path in checked:
                if not inside(path):
                    raise PermissionError("sandbox: " + event + " outside the working directory is not allowed")
        elif event == "object.__setattr__" and args[0] is hook:
            raise PermissionError("sandbox: the audit hook cannot be changed")

    sys.addaudithook(hook)

_install(os.getcwd(), hook_on)
del _install, hook_on
code = compile(source, "solution.py", "exec")
del source
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _dropping_privileges() -> bool:
    """Linux ignores RLIMIT_NPROC for root, so a root parent runs the child as `nobody`."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


@functools.lru_cache(maxsize=1)
def sandbox_python() -> str:
    """An interpreter the child can run: ours, or (as root, when ours lives under a private
    directory such as /root) a system python3 that `nobody` can execute."""
    candidates = [sys.executable]
    if _dropping_privileges():
        candidates += [shutil.which("python3", path=p) for p in ("/usr/local/bin", "/usr/bin", "/bin")]
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run([python, "-I", "-S", "-c", "import resource"], check=False, env=SAFE_ENV, cwd="/",
                                   capture_output=True, timeout=30, **_child_identity())
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return python
    raise RuntimeError(
        "The code sandbox found no Python interpreter that the unprivileged user 'nobody' can run "
        f"(tried {', '.join(c for c in candidates if c)}). Install python3 in /usr/bin or run as a non-root user."
    )


def _child_identity() -> dict:
    if _dropping_privileges():
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    return {}


def _read_truncated(handle, limit: int) -> str:
    handle.seek(0)
    data = handle.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[... output truncated]" if len(data) > limit else text


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = DEFAULT_LIMITS,
               audit_hook: bool = True) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and wait for it (at most `limits.wall_time_s`).

    Args:
        code: the program's source.
        stdin: text fed to its standard input.
        limits: resource limits.
        audit_hook: install the in-process audit hook (tests turn it off to check the OS limits alone).

    Returns:
        SandboxResult with the status, exit code, truncated stdout/stderr and wall time.

    Example:
        >>> run_python("print(6 * 7)").stdout
        '42\\n'
    """
    python = sandbox_python()
    # As `nobody`, the working directory's parents must be traversable: /tmp is, $TMPDIR may not be.
    base = "/tmp" if _dropping_privileges() and os.path.isdir("/tmp") else None
    workdir = Path(tempfile.mkdtemp(prefix="opensloth-sandbox-", dir=base))
    start = time.monotonic()
    try:
        (workdir / "solution.py").write_text(code)
        if _dropping_privileges():
            os.chown(workdir, NOBODY, NOBODY)
        os.chmod(workdir, 0o700)
        argv = [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, str(int(limits.cpu_time_s)),
                str(limits.memory_mb << 20), str(limits.max_file_mb << 20), "1" if audit_hook else "0"]
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            fin.write(stdin.encode())
            fin.seek(0)
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=dict(SAFE_ENV),
                                    close_fds=True, start_new_session=True, **_child_identity())
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                # The child leads its own process group; kill all of it before reaping.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            rc = proc.returncode
            stdout = _read_truncated(fout, limits.max_output_bytes)
            stderr = _read_truncated(ferr, limits.max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    else:
        status = "ok" if rc == 0 else "error"
    return SandboxResult(status, rc, stdout, stderr, time.monotonic() - start)
