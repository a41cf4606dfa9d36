"""Run model-written Python in a sandboxed subprocess, isolated by the operating system.

Isolation levels (`sandbox_level()` says which one this machine gets; `os info` shows it):

- "namespaces": the child starts under util-linux `unshare` in its own network (only a down
  loopback: no network at all), PID (kill(-1) reaches only itself), mount, IPC and UTS
  namespaces. Before the model's code runs, the bootstrap makes every mount read-only
  (recursively), covers the trainer's working directory, home and caches with empty tmpfs
  (`hidden_paths`) with the interpreter's directories bound back inside (`_mount_plan`), mounts a private tmpfs on /tmp whose `work/` is the working directory, sets
  no_new_privs and drops privileges: as root it becomes uid/gid `nobody` (65534, no groups);
  as a normal user the namespaces come from a user namespace (`unshare --map-root-user`) and
  every capability is dropped.
- "rlimits": where namespaces are unavailable (no `unshare`, user namespaces disabled, a
  container that forbids them), the same program runs without them, as `nobody` when we are
  root, and a warning says once what is then not isolated (network, other processes of the
  same user, the file system outside the working directory beyond the audit hook).

In both, the child has resource limits (`SandboxLimits`): wall time (the process group is
killed), RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC = 0 (no fork, no thread), RLIMIT_FSIZE,
RLIMIT_NOFILE, no core files; an empty environment ({"PATH": "/usr/bin:/bin"} and one BLAS
thread); Python with -I -S -B, the trainer's own interpreter where the OS allows it (with its
site-packages on sys.path; `sandbox_interpreter` says which runs and what it lacks); and an audit
hook that refuses fork/exec/kill/sockets/ctypes and writes outside the working directory (a
second layer, not the boundary: Python's docs say an audit hook is not a sandbox). stdout and
stderr go to files and come back truncated. Graded code (`run_harness`) gets judge-style limits:
the module code once, then each test its own time limit.

What is not isolated, in any level: the kernel is shared (a kernel exploit escapes), CPU time
and caches are shared (timing side channels), and files readable by the child's user stay
readable (read-only), except the hidden directories. See docs/rewards.md, "Threat model".
"""

from __future__ import annotations

import errno
import functools
import logging
import marshal
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)

NOBODY = 65534
# One BLAS/OpenMP thread: the child may start no thread (RLIMIT_NPROC = 0), and numpy's OpenBLAS would.
SAFE_ENV = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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
# {"grade": solution, "jobs": [...], "harness": source, ...} (see run_harness), plus "hide" and
# "expose" (namespaces: see _mount_plan) and "paths" (the trainer's site-packages, on its interpreter).
_BOOTSTRAP = r'''
import os, sys
cpu, mem, fsize, nofile, hook_on, request_fd, results_fd = (int(a) for a in sys.argv[1:8])
mode = sys.argv[8]
with os.fdopen(request_fd, "rb") as _f:
    import marshal  # not json: importing json costs ~20 ms of regex compiling per run
    request = marshal.loads(_f.read())

def _isolate(mode, tmp_bytes, hidden, expose):
    """Inside fresh namespaces, still privileged there: the `hidden` directories covered by empty
    tmpfs, the `expose` directories (the interpreter's) bound back at their own paths inside them,
    every mount read-only, a private /tmp, then drop to `nobody` (root) or drop every capability
    (user namespace)."""
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

    nosuid_nodev = 2 | 4
    handles = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in expose]  # before they are covered
    for path in hidden:
        check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(nosuid_nodev), b"size=64k,mode=755"),
              "hiding " + path)
    for path, handle in zip(expose, handles):
        os.makedirs(path, 0o755, exist_ok=True)  # on the covering tmpfs
        check(libc.mount(("/proc/self/fd/%d" % handle).encode(), path.encode(), None,
                         ctypes.c_ulong(4096 | 16384), None), "exposing " + path)  # MS_BIND | MS_REC
        os.close(handle)
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY}): every mount read-only.
    attr = MountAttr(1, 0, 0, 0)
    check(libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/", ctypes.c_uint(0x8000),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), "read-only mounts")
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
    _isolate(mode, 4 * fsize, request.pop("hide", ()), request.pop("expose", ()))
sys.path.extend(request.pop("paths", ()))
import resource
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
del _isolate, cpu, mem, fsize, nofile, mode, _f

def _install(root, hook_on):
    """The audit hook: a second layer against harm to the machine (processes, signals, sockets,
    ctypes, writes outside `root`, other processes' /proc). It does not guard the grading, which
    holds nothing secret in this process. It keeps everything it uses in default arguments of
    immutable types (no closure cell or dict a solution could rewrite once it reaches the hook's
    frame through a traceback), and refuses rewriting its own code or defaults."""
    if not hook_on:
        return
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = frozenset((
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill",
        "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "ctypes.call_function", "socket.connect", "socket.bind", "socket.sendto",
        "socket.sendmsg", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
        "sqlite3.connect", "os.pidfd_open", "signal.pthread_kill",
    ))
    blocked_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"))
    path_args = (("os.remove", (0,)), ("os.rmdir", (0,)), ("os.mkdir", (0,)), ("os.truncate", (0,)),
                 ("os.chmod", (0,)), ("os.chown", (0,)), ("os.utime", (0,)), ("os.chdir", (0,)),
                 ("os.rename", (0, 1)), ("os.link", (0, 1)), ("os.symlink", (1,)), ("os.chflags", (0,)))
    function = type(_install)

    def hook(event, args, _root=root, _sep=os.sep, _blocked=blocked, _imports=blocked_imports, _writes=writes,
             _path_events=frozenset(e for e, _ in path_args), _path_args=path_args, _realpath=os.path.realpath,
             _isdir=os.path.isdir, _fsdecode=os.fsdecode, _type=type, _int=int, _function=function,
             _PermissionError=PermissionError, _ImportError=ImportError,
             _guarded=frozenset(("__code__", "__defaults__", "__kwdefaults__")), _qualname="_install.<locals>.hook"):
        if event in _blocked:
            raise _PermissionError("sandbox: " + event + " is not allowed")
        if event == "import":
            if args[0] in _imports:
                raise _ImportError("sandbox: importing " + args[0] + " is not allowed")
        elif event == "open":
            path, flags = args[0], args[2]
            if _type(path) is _int:
                return  # an already open descriptor
            name = _fsdecode(path)
            real = _realpath(name)
            if real == _root or real.startswith(_root + _sep):
                return
            if (flags or 0) & _writes or _isdir(name):
                raise _PermissionError("sandbox: writing outside the working directory is not allowed: " + name)
            if real.startswith("/proc/") and not name.startswith("/proc/self/"):
                raise _PermissionError("sandbox: reading " + name + " is not allowed")
        elif event in _path_events:
            for known, positions in _path_args:
                if known == event:
                    for i in positions:
                        path = args[i]
                        if _type(path) is _int:
                            continue
                        real = _realpath(_fsdecode(path))
                        if real != _root and not real.startswith(_root + _sep):
                            raise _PermissionError("sandbox: " + event + " outside the working directory is not allowed")
        elif event == "object.__setattr__" and _type(args[0]) is _function and args[1] in _guarded \
                and args[0].__code__.co_qualname == _qualname and args[0].__code__.co_filename == "<string>":
            raise _PermissionError("sandbox: the audit hook cannot be changed")

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
    _timing = (request.pop("first"), request.pop("test_timeout_s"), request.pop("module_timeout_s"))
    del _install, hook_on, _harness, request
    _run(_grade, _jobs, results_fd, *_timing)
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


def _system_pythons() -> list[str]:
    return [p for p in (shutil.which("python3", path=d) for d in ("/usr/local/bin", "/usr/bin", "/bin")) if p]


def _runnable_as_child(python: str) -> bool:
    """Can the child's user (`nobody` as root) run `python` without namespaces?"""
    try:
        probe = subprocess.run([python, "-I", "-S", "-c", "import resource, marshal"], check=False, env=SAFE_ENV,
                               cwd="/", capture_output=True, timeout=30, **_child_identity())
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def sandbox_python() -> str:
    """The interpreter that runs model code: the trainer's own (sys.executable) wherever it can,
    including as root with namespaces (its directories are bound into the child's view, see
    `_mount_plan`); else a system python3 that `nobody` can execute (root without namespaces,
    when ours lives under a private directory such as /root)."""
    return _setup()[2]


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
    """(namespaces usable, why not); see `_setup`."""
    return _setup()[:2]


def _setup() -> tuple[bool, str, str]:
    """(namespaces usable, why not, interpreter). Probes once per process (completions are scored
    from several threads at once, hence the lock) by running a real sandboxed program that checks
    its own isolation; on failure warns once, naming what is not isolated."""
    with _PROBE_LOCK:
        return _probe_setup()


# Its own PID space (the init shell is 1), no route to 127.0.0.1, a read-only root, /tmp/work; the
# socket module is imported after the privileges are dropped, so the standard library is readable.
_ISOLATION_PROBE = ("import os, socket\nassert os.getpid() == 2, os.getpid()\n"
                    "s = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 9))\nexcept OSError as e:\n"
                    "    print(e.errno)\nprint(bool(os.statvfs('/').f_flag & os.ST_RDONLY), os.getcwd())")


@functools.lru_cache(maxsize=1)
def _probe_setup() -> tuple[bool, str, str]:
    candidates = list(dict.fromkeys([sys.executable, *(_system_pythons() if _dropping_privileges() else [])]))
    why = ""
    if os.environ.get("OPENSLOTH_SANDBOX_NAMESPACES", "1") == "0":
        why = "turned off by OPENSLOTH_SANDBOX_NAMESPACES=0"
    elif sys.platform != "linux":
        why = f"{sys.platform} is not Linux"
    elif _unshare_argv() is None:
        why = "util-linux `unshare` is not installed"
    else:
        for python in candidates:
            try:
                result = _run(_ISOLATION_PROBE, "", DEFAULT_LIMITS, audit_hook=False, namespaces=True, python=python)
            except OSError as exc:
                result = SandboxResult("error", None, "", str(exc), 0.0)
            if result.ok and result.stdout.split() == [str(errno.ENETUNREACH), "True", "/tmp/work"]:
                return True, "", python
            why = why or "unshare failed: " + (result.stderr.strip().splitlines() or [result.status])[-1][:200]
    python = next((p for p in candidates if _runnable_as_child(p)), None)
    if python is None:
        raise RuntimeError(
            "The code sandbox found no Python interpreter that the unprivileged user 'nobody' can run "
            f"(tried {', '.join(candidates)}). Install python3 in /usr/bin or run as a non-root user.")
    user = "uid nobody" if _dropping_privileges() else "the calling user"
    logger.warning(
        "Code sandbox: Linux namespaces are unavailable (%s). Model-written code runs with resource limits "
        "as %s and a Python audit hook only: it is NOT isolated from the network, from other processes of %s "
        "(signals), or from the file system (world-writable places such as /tmp and /dev/shm) beyond what that "
        "hook catches. Install util-linux, enable user namespaces (sysctl kernel.unprivileged_userns_clone=1), or, "
        "in a container, allow unshare (e.g. docker run --cap-add SYS_ADMIN --security-opt seccomp=unconfined).",
        why, user, user)
    return False, why, python


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


# Packages model code commonly imports: `sandbox_interpreter` names those the trainer has and the
# sandbox's interpreter lacks.
COMMON_PACKAGES = ("numpy", "scipy", "pandas", "sympy", "networkx", "sortedcontainers", "more_itertools")


@functools.lru_cache(maxsize=1)
def sandbox_interpreter() -> dict:
    """Which interpreter runs model code, against the trainer's (shown by `os info` and logged by
    the first code reward of a run). One sandboxed run, cached.

    Returns:
        {"python": path, "version": "3.11.7", "trainer_python": sys.executable, "same_as_trainer": bool,
         "lacks": "" or what it lacks, e.g. "Python 3.11.2 instead of 3.11.7; no numpy, scipy"}
    """
    import importlib.util

    wanted = [name for name in COMMON_PACKAGES if importlib.util.find_spec(name) is not None]
    probe = ("import importlib.util, platform\nprint(platform.python_version())\n"
             f"print(' '.join(n for n in {wanted!r} if importlib.util.find_spec(n) is None))")
    result = run_python(probe)
    lines = result.stdout.splitlines() + ["", ""]
    version, missing = lines[0].strip() or "unknown", lines[1].split()
    ours = ".".join(map(str, sys.version_info[:3]))
    lacks = ([f"Python {version} instead of {ours}"] if version != ours else []) + (
        [f"no {', '.join(missing)} (the trainer has them)"] if missing else [])
    if not result.ok:
        lacks = [f"its probe failed ({(result.stderr.strip().splitlines() or [result.status])[-1][:200]})"]
    python = sandbox_python()
    return {"python": python, "version": version, "trainer_python": sys.executable,
            "same_as_trainer": python == sys.executable and not lacks, "lacks": "; ".join(lacks)}


def _read_truncated(handle, limit: int) -> str:
    handle.seek(0)
    data = handle.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[... output truncated]" if len(data) > limit else text


_KEEP_VISIBLE = {"/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys", "/tmp", "/var", "/opt"}


def hidden_paths() -> list[str]:
    """Directories the namespaced child sees empty: the trainer's working directory, home and
    caches, where datasets (with their expected answers) and checkpoints usually are. Left out:
    / , /usr and the like, and what lies under /tmp (the child gets its own /tmp)."""
    candidates = [os.getcwd(), os.path.expanduser("~"), os.environ.get("HF_HOME"), os.environ.get("XDG_CACHE_HOME")]
    out = []
    for path in dict.fromkeys(os.path.realpath(p) for p in candidates if p and os.path.isabs(p)):
        if os.path.isdir(path) and path not in _KEEP_VISIBLE and not path.startswith("/tmp/"):
            out.append(path)
    return out


def _interpreter_dirs(python: str) -> list[str]:
    """What `python` needs to run model code: its prefixes and, for the trainer's own interpreter,
    its site-packages (the same packages as the trainer)."""
    dirs = [os.path.dirname(os.path.realpath(python))]
    if python == sys.executable:
        dirs += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *_site_packages()]
    return [os.path.realpath(d) for d in dirs if os.path.isdir(d)]


def _site_packages() -> list[str]:
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _mount_plan(python: str, as_nobody: bool) -> tuple[list[str], list[str]]:
    """(hide, expose) for a namespaced child running `python`.

    hide: `hidden_paths()`, plus, when the child becomes `nobody`, the highest directory above
    each interpreter directory that `nobody` cannot traverse (e.g. /root, mode 700): covering a
    directory nobody could not enter anyway shows it nothing new. expose: the interpreter's
    directories that lie under a hidden one, bound back (read-only) at their own paths inside
    the covering tmpfs, so the trainer's interpreter runs there with its own packages while the
    rest of the hidden directories stays empty. Nested entries are dropped (the outer one covers).
    """
    needed = _interpreter_dirs(python)
    hide = hidden_paths()
    if as_nobody:
        for path in needed:
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                ancestor = "/" + "/".join(parts[:depth])
                try:
                    if not os.stat(ancestor).st_mode & 0o001:
                        hide.append(ancestor)
                        break
                except OSError:
                    break
    hide = sorted(set(hide), key=len)
    hide = [h for i, h in enumerate(hide) if not any(_under(h, outer) for outer in hide[:i])]
    expose = sorted({d for d in needed if any(_under(d, h) and d != h for h in hide)}, key=len)
    expose = [d for i, d in enumerate(expose) if not any(_under(d, outer) for outer in expose[:i])]
    return hide, expose


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


KILL_GRACE_S = 0.5  # past a test's own limit (its in-process alarm), the parent kills the process


def harness_budget_s(n_jobs: int, limits: SandboxLimits, test_timeout_s: float) -> float:
    """The most wall time one graded completion may take: the module code's limit, then each test's."""
    return limits.wall_time_s + n_jobs * (test_timeout_s + KILL_GRACE_S)


def run_harness(harness: str, solution: str, jobs: list, *, limits: SandboxLimits = DEFAULT_LIMITS,
                test_timeout_s: float = 2.0) -> SandboxResult:
    """Run a grading harness in the sandbox, judge-style: module code once, each test its own limit.

    `harness` (source, opensloth/rewards/_harness.py) defines `run(solution, jobs, fd, first,
    test_timeout_s, module_timeout_s)`; it is defined before the model's code runs and writes its
    records to the results descriptor it is given (SandboxResult.records, every run's, in order).
    The parent watches the records as they come: the module code gets `limits.wall_time_s`, each
    test `test_timeout_s` (+ KILL_GRACE_S). Past it the process is killed, the test in progress
    (the one after the last recorded) fails, and a new process runs the tests after it; the whole
    completion stops at `harness_budget_s`. A process that dies in a test is treated the same way.
    """
    start = time.monotonic()
    budget = harness_budget_s(len(jobs), limits, test_timeout_s)
    # RLIMIT_CPU per process: the module's CPU seconds plus every test's limit.
    limits = replace(limits, cpu_time_s=int(limits.cpu_time_s + math.ceil(len(jobs) * test_timeout_s)))
    first, records, result = 0, b"", None
    while first < len(jobs):
        left = budget - (time.monotonic() - start)
        if left <= 0.05:
            break
        request = {"grade": solution, "jobs": jobs[first:], "harness": harness, "first": first,
                   "test_timeout_s": float(test_timeout_s), "module_timeout_s": float(limits.wall_time_s)}
        watch = _Progress(limits.wall_time_s + KILL_GRACE_S, test_timeout_s + KILL_GRACE_S, left)
        result = _run(request, "", limits, True, _isolation()[0], watch=watch)
        records += result.records
        if not watch.module_done:
            break  # the module code hung, or the process did not start: every test fails
        done = first - 1 if watch.last_index is None else watch.last_index
        if done + 1 >= len(jobs):
            break
        first = done + 2  # the test after the last recorded one hung or crashed: it fails alone
    if result is None:
        return SandboxResult("timeout", None, "", "", time.monotonic() - start, records)
    return replace(result, elapsed_s=time.monotonic() - start, records=records)


class _Progress:
    """Deadlines for a harness process, from its records: `module_s` until the "M" record, then
    `test_s` after each record, never past `total_s` (seconds from the start of the process)."""

    def __init__(self, module_s: float, test_s: float, total_s: float):
        self.module_s, self.test_s, self.total_s = module_s, test_s, total_s
        self.module_done, self.last_index, self._tail = False, None, b""

    def feed(self, data: bytes) -> bool:
        """Take new record bytes; True when something ended (a deadline moves)."""
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()[-64:]
        moved = False
        for line in lines:
            if line == b"M":
                self.module_done = moved = True
            else:
                head = line.split(b"\t", 1)[0]
                if head.isdigit() and len(head) < 9:
                    self.last_index = max(int(head), self.last_index if self.last_index is not None else -1)
                    moved = True
        return moved

    def deadline(self, started: float, last_event: float) -> float:
        phase = last_event + self.test_s if self.module_done else started + self.module_s
        return min(phase, started + self.total_s)


def _run(request: dict | str, stdin: str, limits: SandboxLimits, audit_hook: bool, namespaces: bool,
         python: str | None = None, watch: _Progress | None = None) -> SandboxResult:
    """One sandboxed process. Without `watch`, it may run `limits.wall_time_s`; with one, until
    `watch`'s deadlines (fed the results channel as it is written)."""
    if isinstance(request, str):
        request = {"code": request}
    python = python or sandbox_python()
    mode = ("ns-root" if _dropping_privileges() else "ns-user") if namespaces else "plain"
    if namespaces:
        hide, expose = _mount_plan(python, _dropping_privileges())
        request = {**request, "hide": hide, "expose": expose}
    if python == sys.executable:
        request = {**request, "paths": _site_packages()}
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
    results_r, results_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr, \
                tempfile.TemporaryFile() as freq:
            fin.write(stdin.encode())
            fin.seek(0)
            freq.write(marshal.dumps(request, 4))  # plain dict/list/str: readable by any Python 3
            freq.seek(0)
            argv += [str(freq.fileno()), str(results_w), mode]
            identity = {} if namespaces else _child_identity()
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir or "/", env=dict(SAFE_ENV),
                                    close_fds=True, pass_fds=(freq.fileno(), results_w),
                                    start_new_session=True, **identity)
            os.close(results_w)
            results_w = -1
            records, timed_out = _collect(proc, results_r, limits, watch, start)
            if timed_out:
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
    finally:
        os.close(results_r)
        if results_w >= 0:
            os.close(results_w)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    else:
        status = "ok" if rc == 0 else "error"
    return SandboxResult(status, rc, stdout, stderr, time.monotonic() - start, records)


def _collect(proc: subprocess.Popen, fd: int, limits: SandboxLimits, watch: _Progress | None,
             started: float) -> tuple[bytes, bool]:
    """Read the results channel until it closes (the process ended) or a deadline passes.
    Returns (records, timed out). More than the file-size limit of records is a timeout too."""
    cap = limits.max_file_mb << 20
    chunks, size, last_event = [], 0, started
    while True:
        end = watch.deadline(started, last_event) if watch else started + limits.wall_time_s
        left = end - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if size > cap:
            return b"".join(chunks), True
        if watch and watch.feed(data):
            last_event = time.monotonic()
    try:  # the channel closed: the process is ending
        proc.wait(timeout=max(0.0, (watch.deadline(started, last_event) if watch else started + limits.wall_time_s)
                              - time.monotonic()) + 0.1)
    except subprocess.TimeoutExpired:
        return b"".join(chunks), True
    return b"".join(chunks), False
