"""Run model-written Python in a sandboxed subprocess, isolated by the operating system.

Isolation levels (`sandbox_level()` says which one this machine gets; `os info` shows it):

- "namespaces": the child starts under util-linux `unshare` in its own network (only a down
  loopback: no network at all), PID (kill(-1) reaches only itself), mount, IPC and UTS
  namespaces. Before the model's code runs, the bootstrap makes every mount read-only
  (recursively), covers the trainer's working directory, home and caches with empty tmpfs
  (`hidden_paths`), mounts a private tmpfs on /tmp whose `work/` is the working directory, sets
  no_new_privs and drops privileges: as root it becomes uid/gid `nobody` (65534, no groups);
  as a normal user the namespaces come from a user namespace (`unshare --map-root-user`) and
  every capability is dropped.
- "rlimits": where namespaces are unavailable (no `unshare`, user namespaces disabled, a
  container that forbids them), the same program runs without them, as `nobody` when we are
  root, and a warning says once what is then not isolated (network, other processes of the
  same user, the file system outside the working directory beyond the audit hook).

In both, the child has resource limits (`SandboxLimits`): wall time (the process group is
killed), RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC = 0 (no fork, no thread), RLIMIT_FSIZE,
RLIMIT_NOFILE, no core files; an empty environment ({"PATH": "/usr/bin:/bin"}); Python with
-I -S -B (standard library only); and an audit hook that refuses fork/exec/kill/sockets/ctypes
and writes outside the working directory (a second layer, not the boundary: Python's docs say
an audit hook is not a sandbox). stdout and stderr go to files and come back truncated.

What is not isolated, in any level: the kernel is shared (a kernel exploit escapes), CPU time
and caches are shared (timing side channels), and files readable by the child's user stay
readable (read-only), except the hidden directories. See docs/rewards.md, "Threat model".
"""

from __future__ import annotations

import errno
import functools
import logging
import marshal
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

NOBODY = 65534
SAFE_ENV = {"PATH": "/usr/bin:/bin"}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (see the module docstring for how each is enforced)."""

    wall_time_s: float = 5.0
    cpu_time_s: int = 5
    memory_mb: int = 512
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 16_384


DEFAULT_LIMITS = SandboxLimits()


@dataclass
class SandboxResult:
    """What happened. status: "ok" (exit 0), "error" (non-zero exit), "timeout" (wall or CPU limit).

    `records`: what the grading harness wrote to its result channel (empty for plain programs).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed_s: float
    records: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# Runs in the child before the model's code. argv: cpu seconds, address-space bytes, file bytes,
# open files, audit hook on (1/0), request fd, results fd, isolation mode (ns-root, ns-user,
# plain). The request (marshal, read and closed before any model code runs) is {"code": program} or
# {"grade": solution, "jobs": [...], "harness": source} (see opensloth.rewards.code).
_BOOTSTRAP = r'''
import os, sys
cpu, mem, fsize, nofile, hook_on, request_fd, results_fd = (int(a) for a in sys.argv[1:8])
mode = sys.argv[8]
with os.fdopen(request_fd, "rb") as _f:
    import marshal  # not json: importing json costs ~20 ms of regex compiling per run
    request = marshal.loads(_f.read())

def _isolate(mode, tmp_bytes, hidden):
    """Inside fresh namespaces, still privileged there: everything read-only, the `hidden`
    directories covered by empty read-only tmpfs, a private /tmp, then drop to `nobody` (root)
    or drop every capability (user namespace)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, "sandbox setup: " + what + ": " + os.strerror(err))

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY}): every mount read-only.
    attr = MountAttr(1, 0, 0, 0)
    check(libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/", ctypes.c_uint(0x8000),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), "read-only mounts")
    nosuid_nodev = 2 | 4
    for path in hidden:
        check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(1 | nosuid_nodev), b"size=4k,mode=755"),
              "hiding " + path)
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ctypes.c_ulong(nosuid_nodev),
                     ("size=%d,mode=1777" % tmp_bytes).encode()), "private /tmp")
    os.mkdir("/tmp/work", 0o700)
    if mode == "ns-root":
        os.chown("/tmp/work", 65534, 65534)
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)  # all capabilities go with uid 0
    else:
        for cap in range(64):  # the bounding set: an exec can never regain one
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                break
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        check(libc.syscall(ctypes.c_long(126), header, data), "dropping capabilities")
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
    os.chdir("/tmp/work")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]

if mode.startswith("ns-"):
    _isolate(mode, 4 * fsize, request.pop("hide", ()))
import resource
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
del _isolate, cpu, mem, fsize, nofile, mode, _f

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
        "socket.sendmsg", "os.putenv", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
        "sqlite3.connect", "os.pidfd_open", "signal.pthread_kill", "sys._getframe", "sys._current_frames",
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
    # No audit event covers these (CPython 3.11): take them away instead. memfd_create: its
    # memory counts against no rlimit of ours (up to 16 MiB x 64 files).
    import posix
    for module in (os, posix):
        for name in ("mkfifo", "mknod", "memfd_create"):
            if hasattr(module, name):
                delattr(module, name)

if "grade" in request:
    _harness = {"__name__": "_opensloth_harness"}
    exec(request.pop("harness"), _harness)  # the parent's harness, defined before any model code
    _run, _grade, _jobs = _harness["run"], request.pop("grade"), request.pop("jobs")
    _install(os.getcwd(), hook_on)
    del _install, hook_on, _harness, request
    _run(_grade, _jobs, results_fd)
else:
    os.close(results_fd)
    code = compile(request.pop("code"), "solution.py", "exec")
    _install(os.getcwd(), hook_on)
    del _install, hook_on, request
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
            probe = subprocess.run([python, "-I", "-S", "-c", "import resource, marshal"], check=False, env=SAFE_ENV,
                                   cwd="/", capture_output=True, timeout=30, **_child_identity())
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


def _unshare_argv() -> list[str] | None:
    """The `unshare` prefix for this user, or None when util-linux unshare is not installed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    user = [] if _dropping_privileges() else ["--map-root-user"]
    # A shell is PID 1 of the new PID namespace and Python its child: PID 1 ignores the signals it
    # has no handler for (SIGXCPU, its own kill), and "$@"; exit $? keeps dash from exec'ing it.
    return [unshare, *user, "--net", "--mount", "--pid", "--fork", "--mount-proc", "--ipc", "--uts",
            "--kill-child", "/bin/sh", "-c", '"$@"; exit $?', "sandbox-init"]


NAMESPACES_LEVEL = "namespaces (net, pid, mount, ipc, uts) + read-only root + private /tmp + rlimits + {user}"
RLIMITS_LEVEL = "rlimits + {user} + audit hook only (no namespaces: {why})"


_PROBE_LOCK = threading.Lock()


def _isolation() -> tuple[bool, str]:
    """(namespaces usable, why not). Probes once per process (completions are scored from several
    threads at once, hence the lock) by running a real sandboxed program that checks its own
    isolation; on failure warns once, naming what is not isolated."""
    with _PROBE_LOCK:
        return _probe_isolation()


@functools.lru_cache(maxsize=1)
def _probe_isolation() -> tuple[bool, str]:
    if os.environ.get("OPENSLOTH_SANDBOX_NAMESPACES", "1") == "0":
        why = "turned off by OPENSLOTH_SANDBOX_NAMESPACES=0"
    elif sys.platform != "linux":
        why = f"{sys.platform} is not Linux"
    elif _unshare_argv() is None:
        why = "util-linux `unshare` is not installed"
    else:
        # Its own PID space (the init shell is 1), no route to 127.0.0.1, a read-only root, /tmp/work.
        probe = ("import os, socket\nassert os.getpid() == 2, os.getpid()\n"
                 "s = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 9))\nexcept OSError as e:\n"
                 "    print(e.errno)\nprint(bool(os.statvfs('/').f_flag & os.ST_RDONLY), os.getcwd())")
        try:
            result = _run(probe, "", DEFAULT_LIMITS, audit_hook=False, namespaces=True)
        except OSError as exc:
            result = SandboxResult("error", None, "", str(exc), 0.0)
        lines = result.stdout.split()
        if result.ok and lines == [str(errno.ENETUNREACH), "True", "/tmp/work"]:
            return True, ""
        why = "unshare failed: " + (result.stderr.strip().splitlines() or [result.status])[-1][:200]
    user = "uid nobody" if _dropping_privileges() else "the calling user"
    logger.warning(
        "Code sandbox: Linux namespaces are unavailable (%s). Model-written code runs with resource limits "
        "as %s and a Python audit hook only: it is NOT isolated from the network, from other processes of %s "
        "(signals), or from the file system (world-writable places such as /tmp and /dev/shm) beyond what that "
        "hook catches. Install util-linux, enable user namespaces (sysctl kernel.unprivileged_userns_clone=1), or, "
        "in a container, allow unshare (e.g. docker run --cap-add SYS_ADMIN --security-opt seccomp=unconfined).",
        why, user, user)
    return False, why


def sandbox_isolated() -> bool:
    """True when model-written code runs in its own namespaces here (see `sandbox_level`)."""
    return _isolation()[0]


def sandbox_level() -> str:
    """The isolation this process's code sandbox gets, in words (shown by `os info`)."""
    usable, why = _isolation()
    user = "uid nobody" if _dropping_privileges() else "user namespace, no capabilities"
    if usable:
        return NAMESPACES_LEVEL.format(user=user)
    return RLIMITS_LEVEL.format(user="uid nobody" if _dropping_privileges() else "the calling user", why=why)


def _read_truncated(handle, limit: int) -> str:
    handle.seek(0)
    data = handle.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[... output truncated]" if len(data) > limit else text


def hidden_paths() -> list[str]:
    """Directories the namespaced child sees empty: the trainer's working directory, home and
    caches, where datasets (with their expected answers) and checkpoints usually are. Left out:
    anything the child's interpreter lives under, and / , /usr and the like."""
    python_home = os.path.dirname(os.path.dirname(os.path.realpath(sandbox_python())))
    keep = {"/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys", "/tmp", "/var", "/opt"}
    candidates = [os.getcwd(), os.path.expanduser("~"), os.environ.get("HF_HOME"), os.environ.get("XDG_CACHE_HOME")]
    out = []
    for path in dict.fromkeys(os.path.realpath(p) for p in candidates if p and os.path.isabs(p)):
        inside_python = python_home == path or python_home.startswith(path + os.sep)
        if os.path.isdir(path) and path not in keep and not path.startswith("/tmp/") and not inside_python:
            out.append(path)
    return out


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits = DEFAULT_LIMITS,
               audit_hook: bool = True) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and wait for it (at most `limits.wall_time_s`).

    Args:
        code: the program's source.
        stdin: text fed to its standard input.
        limits: resource limits.
        audit_hook: install the in-process audit hook (tests turn it off to check the OS layer alone).

    Returns:
        SandboxResult with the status, exit code, truncated stdout/stderr and wall time.

    Example:
        >>> run_python("print(6 * 7)").stdout
        '42\\n'
    """
    return _run({"code": code}, stdin, limits, audit_hook, _isolation()[0])


def run_harness(harness: str, solution: str, jobs: list, *, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Run a grading harness in the sandbox: `harness` (source) defines `run(solution, jobs, fd)` and
    it is defined before the model's code runs, and
    writes its records to the results descriptor it is given (SandboxResult.records)."""
    return _run({"grade": solution, "jobs": jobs, "harness": harness}, "", limits, True, _isolation()[0])


def _run(request: dict | str, stdin: str, limits: SandboxLimits, audit_hook: bool, namespaces: bool) -> SandboxResult:
    if isinstance(request, str):
        request = {"code": request}
    python = sandbox_python()
    mode = ("ns-root" if _dropping_privileges() else "ns-user") if namespaces else "plain"
    if namespaces:
        request = {**request, "hide": hidden_paths()}
    workdir = None
    if not namespaces:
        # As `nobody`, the working directory's parents must be traversable: /tmp is, $TMPDIR may not be.
        base = "/tmp" if _dropping_privileges() and os.path.isdir("/tmp") else None
        workdir = Path(tempfile.mkdtemp(prefix="opensloth-sandbox-", dir=base))
        if _dropping_privileges():
            os.chown(workdir, NOBODY, NOBODY)
        os.chmod(workdir, 0o700)
    start = time.monotonic()
    argv = [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, str(int(limits.cpu_time_s)), str(limits.memory_mb << 20),
            str(limits.max_file_mb << 20), str(limits.max_open_files), "1" if audit_hook else "0"]
    if namespaces:
        argv = _unshare_argv() + argv
    try:
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr, \
                tempfile.TemporaryFile() as freq, tempfile.TemporaryFile() as fres:
            fin.write(stdin.encode())
            fin.seek(0)
            freq.write(marshal.dumps(request, 4))  # plain dict/list/str: readable by any Python 3
            freq.seek(0)
            argv += [str(freq.fileno()), str(fres.fileno()), mode]
            identity = {} if namespaces else _child_identity()
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir or "/", env=dict(SAFE_ENV),
                                    close_fds=True, pass_fds=(freq.fileno(), fres.fileno()),
                                    start_new_session=True, **identity)
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
            if namespaces and rc is not None and rc > 128:  # the init shell reports a signal as 128 + n
                rc = 128 - rc
            stdout = _read_truncated(fout, limits.max_output_bytes)
            stderr = _read_truncated(ferr, limits.max_output_bytes)
            fres.seek(0)
            records = fres.read(limits.max_file_mb << 20)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    else:
        status = "ok" if rc == 0 else "error"
    return SandboxResult(status, rc, stdout, stderr, time.monotonic() - start, records)
