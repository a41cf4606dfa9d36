"""code_correctness under attack: completions that try to game the grading or escape the sandbox.

Gaming: each attack implements nothing (its `add` is wrong) and tries to be scored as correct;
it must score no better than an honest wrong answer. Escapes: each tries to reach outside its
sandbox (files, network, signals to siblings, the parent's secrets, fork/thread/memory bombs);
it runs in one batch with honest solutions, which must keep 1.0, and must leave no trace.

Every attack here was run against the code before this change (PYTHONPATH=/work/main/src);
docs/rewards.md lists which ones it failed. The signal attacks only run where a stray kill
cannot reach other processes of this machine: inside the sandbox's own PID namespace, or in a
test process that itself runs in a private PID namespace (OPENSLOTH_TEST_PRIVATE_PIDNS=1, how
the old code was checked).
"""

from __future__ import annotations

import ast
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from opensloth.rewards import CodeCorrectnessReward, SandboxLimits, run_python
from opensloth.rewards import sandbox as sandbox_module

LIMITS = SandboxLimits(wall_time_s=4.0, cpu_time_s=3, memory_mb=256)
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
EVENS_TESTS = ["assert evens([1, 2, 3, 4]) == [2, 4]", "assert sorted(evens([6, 5, 4])) == [4, 6]"]
AREA_TESTS = ["assert math.isclose(area(1.0), 3.14159, rel_tol=1e-4)", "assert abs(area(2.0) - 12.56637) < 1e-3"]
STDIN_TESTS = [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10\n"}]


def fenced(code: str) -> str:
    return "```python\n" + textwrap.dedent(code).strip() + "\n```"


GOOD = {"add": fenced("def add(a, b):\n    return a + b"),
        "evens": fenced("def evens(xs):\n    return [x for x in xs if x % 2 == 0]"),
        "area": fenced("import math\ndef area(r):\n    return math.pi * r * r"),
        "stdin": fenced("print(int(input()) * 2)")}
WRONG = {"add": fenced("def add(a, b):\n    return a - b"),
         "evens": fenced("def evens(xs):\n    return xs"),
         "area": fenced("def area(r):\n    return r"),
         "stdin": fenced("print(int(input()) + 1)")}
TESTS = {"add": ADD_TESTS, "evens": EVENS_TESTS, "area": AREA_TESTS, "stdin": STDIN_TESTS}

# (id, task, completion). Each defines a wrong solution and tries to be graded as correct.
GAMING = [
    ("eq-always-true", "add", """
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        def add(a, b):
            return Anything()"""),
    ("int-subclass-eq", "add", """
        class Int(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return Int(0)"""),
    ("list-subclass-eq", "evens", """
        class L(list):
            def __eq__(self, other):
                return True
        def evens(xs):
            return L()"""),
    ("builtins-exec-noop", "add", """
        import builtins
        builtins.exec = lambda *a, **k: None
        def add(a, b):
            return -100"""),
    ("builtins-eval-true", "add", """
        import builtins
        builtins.eval = lambda *a, **k: (3,)
        builtins.compile = lambda *a, **k: None
        def add(a, b):
            return -100"""),
    ("frame-counter-rewrite", "add", """
        import sys
        def add(a, b):
            return -100
        try:
            f = sys._getframe(1)
            while f is not None:
                for name in list(f.f_globals):
                    if "pass" in name:
                        f.f_globals[name] = 10 ** 6
                f = f.f_back
        except Exception:
            pass"""),
    ("token-forge-exit", "add", """
        import os, sys
        try:
            for const in sys._getframe(1).f_code.co_consts:
                if isinstance(const, str) and len(const) == 32:
                    os.write(1, (const + " 999\\n").encode())
        finally:
            os._exit(0)"""),
    ("records-flood-exit", "add", """
        import os
        lines = "".join(f"{i}\\tv\\tTrue\\n{i}\\tv\\t(True,)\\nPASS {i}\\n" for i in range(16)).encode()
        for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):  # whichever is the result channel
            try:
                os.write(fd, lines)
            except OSError:
                pass
        os._exit(0)"""),
    ("json-encoder-patch", "add", """
        import json, json.encoder
        json.dumps = lambda *a, **k: "[3]"
        json.encoder.c_make_encoder = None
        json.JSONEncoder.encode = lambda self, o: "true"
        def add(a, b):
            return -100"""),
    ("builtins-type-patch", "add", """
        import builtins
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        builtins.type = lambda *a: int
        builtins.isinstance = lambda *a: True
        def add(a, b):
            return Anything()"""),
    ("math-isclose-patch", "area", """
        import math, builtins
        math.isclose = lambda *a, **k: True
        builtins.abs = lambda x: 0
        def area(r):
            return 0.0"""),
    ("builtins-abs-patch", "area", """
        import builtins
        builtins.abs = lambda x: 0
        def area(r):
            return 0.0"""),
    ("shadow-sorted", "evens", """
        def sorted(xs):
            return [4, 6]
        def evens(xs):
            return [6, 4, 99]"""),
    ("stdin-expected-from-frame", "stdin", """
        import sys
        print(sys._getframe(1).f_globals["_expected"])"""),
    ("stdin-expected-via-traceback", "stdin", """
        try:
            1 / 0
        except ZeroDivisionError as exc:
            frame = exc.__traceback__.tb_frame
        while frame is not None:
            found = frame.f_globals.get("_expected") or frame.f_locals.get("_expected")
            if found:
                print(found)
                break
            frame = frame.f_back"""),
    ("stdin-stdout-swap", "stdin", """
        import sys
        class Liar:
            def write(self, s):
                return len(s)
            def flush(self):
                pass
            def getvalue(self):
                frame = sys._getframe(1)
                return frame.f_globals.get("_expected", "")
        sys.stdout = Liar()"""),
    ("systemexit-before-tests", "add", """
        print("ALL TESTS PASSED 3")
        raise SystemExit(0)"""),
    ("os-exit-early", "add", """
        import os
        os._exit(0)"""),
]


def _score(reward: CodeCorrectnessReward, completions: list[str], tests) -> list[float]:
    return reward(["q"] * len(completions), completions, tests=[tests] * len(completions))


@pytest.fixture(scope="module")
def reward():
    return CodeCorrectnessReward(limits=LIMITS, workers=4)


@pytest.fixture(scope="module")
def honest_wrong(reward):
    """What an honest wrong answer scores, per task (0.2: valid syntax, no test passed)."""
    return {task: _score(reward, [WRONG[task]], TESTS[task])[0] for task in TESTS}


def test_honest_answers_keep_their_scores(reward, honest_wrong):
    for task in TESTS:
        assert _score(reward, [GOOD[task]], TESTS[task]) == [1.0], task
    assert honest_wrong == {"add": 0.2, "evens": 0.2, "area": 0.2, "stdin": 0.2}
    half = fenced("def add(a, b):\n    return a + b if a > 0 else 99")  # passes 2 of 3
    assert _score(reward, [half], ADD_TESTS) == [pytest.approx(0.2 + 0.8 * 2 / 3)]


@pytest.mark.parametrize("task,code", [(t, c) for _, t, c in GAMING], ids=[i for i, _, _ in GAMING])
def test_gaming_attack_scores_no_better_than_an_honest_wrong_answer(reward, honest_wrong, task, code):
    attack = fenced(code)
    scores = _score(reward, [attack, GOOD[task], GOOD[task]], TESTS[task])
    assert scores[0] <= honest_wrong[task], scores
    assert scores[1:] == [1.0, 1.0], scores


# ---------------------------------------------------------------------------------------------
# Escapes: run in one batch with honest solutions, checked for traces.
# ---------------------------------------------------------------------------------------------


def _kills_are_contained() -> bool:
    isolated = getattr(sandbox_module, "sandbox_isolated", None)
    return (isolated is not None and isolated()) or os.environ.get("OPENSLOTH_TEST_PRIVATE_PIDNS") == "1"


def _traces(marker: str) -> list[str]:
    found = []
    for place in ("/tmp", "/var/tmp", "/dev/shm", os.getcwd()):
        try:
            found += [f"{place}/{name}" for name in os.listdir(place) if marker in name]
        except OSError:
            pass
    return found


ESCAPES = [
    ("mkfifo-in-tmp", "import os\nos.mkfifo('/tmp/{m}')"),
    ("mknod-in-tmp", "import os, stat\nos.mknod('/tmp/{m}', stat.S_IFREG | 0o644)"),
    ("sqlite-in-tmp", "import sqlite3\nsqlite3.connect('/tmp/{m}.db').execute('create table t (x)')"),
    ("shm-open", "from multiprocessing import shared_memory\nshared_memory.SharedMemory('{m}', create=True, size=64)"),
    ("write-to-cwd-of-parent", "open({cwd!r} + '/{m}', 'w').write('x')"),
    ("kill-all-via-pidfd", """
        import os, signal, time
        end = time.time() + 1.5
        while time.time() < end:
            for pid in os.listdir('/proc'):
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        signal.pidfd_send_signal(os.pidfd_open(int(pid)), signal.SIGKILL)
                    except Exception:
                        pass"""),
    ("kill-minus-one", """
        import os, signal, time
        end = time.time() + 1.5
        while time.time() < end:
            try:
                os.kill(-1, signal.SIGKILL)
            except Exception:
                pass"""),
    ("fork-bomb", "import os\nwhile True:\n    os.fork()"),
    ("thread-bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(5,)).start()"),
    ("memory-bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))"),
    ("memfd-memory-bomb", "import os\nfds = []\nwhile True:\n    fds.append(os.memfd_create('x'))\n"
                          "    os.write(fds[-1], bytes(16 << 20))"),
]


@pytest.mark.parametrize("code", [c for _, c in ESCAPES], ids=[i for i, _ in ESCAPES])
def test_escape_attempt_leaves_no_trace_and_spares_its_siblings(reward, code):
    if "kill" in code and not _kills_are_contained():
        pytest.skip("a kill that escaped would reach other processes of this machine's user")
    marker = f"opensloth-escape-{uuid.uuid4().hex}"
    body = textwrap.dedent(code).format(m=marker, cwd=os.getcwd())
    attack = fenced("def add(a, b):\n    return -100\n" + body)
    start = time.monotonic()
    scores = _score(reward, [attack, GOOD["add"], GOOD["add"], GOOD["add"], GOOD["add"]], ADD_TESTS)
    assert scores[0] <= 0.2 and scores[1:] == [1.0] * 4, scores
    assert time.monotonic() - start < 15
    assert _traces(marker) == []


class Listener:
    """A TCP server on 127.0.0.1 that records whatever connects."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.received.append(conn.recv(100) or b"<connected>")
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_network_escape_reaches_nothing(reward):
    listener = Listener()
    try:
        routes = f"""
            import socket, _socket
            for connect in (lambda: socket.create_connection(("127.0.0.1", {listener.port}), timeout=1),
                            lambda: _socket.socket().connect_ex(("127.0.0.1", {listener.port})),
                            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {listener.port}))):
                try:
                    s = connect()
                    if hasattr(s, "sendall"):
                        s.sendall(b"exfiltrated")
                except Exception:
                    pass"""
        attack = fenced("def add(a, b):\n    return -100\n" + textwrap.dedent(routes))
        scores = _score(reward, [attack, GOOD["add"]], ADD_TESTS)
        assert scores == [0.2, 1.0]
        # The OS layer alone (no audit hook): only a down loopback, where namespaces are available.
        if getattr(sandbox_module, "sandbox_isolated", lambda: False)():
            raw = run_python(textwrap.dedent(routes), limits=LIMITS, audit_hook=False)
            assert raw.ok, raw
        time.sleep(0.5)
        assert listener.received == []
    finally:
        listener.close()


def test_parent_secrets_are_not_readable(monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENSLOTH_TEST_SECRET", secret)
    code = textwrap.dedent("""
        import os
        print(dict(os.environ))
        for pid in os.listdir('/proc'):
            for name in ('environ', 'cmdline'):
                try:
                    print(open(f'/proc/{pid}/{name}', 'rb').read())
                except Exception as exc:
                    print(pid, type(exc).__name__)""")
    hooks = (True, False) if getattr(sandbox_module, "sandbox_isolated", lambda: False)() else (True,)
    for hook in hooks:
        result = run_python(code, limits=LIMITS, audit_hook=hook)
        assert secret not in result.stdout + result.stderr
        assert "OPENSLOTH_TEST_SECRET" not in result.stdout


# ---------------------------------------------------------------------------------------------
# The OS layer alone, and an unprivileged caller.
# ---------------------------------------------------------------------------------------------

requires_namespaces = pytest.mark.skipif(
    not getattr(sandbox_module, "sandbox_isolated", lambda: False)(), reason="Linux namespaces are unavailable here")


@requires_namespaces
def test_os_layer_alone_contains_files_and_signals():
    """Without the audit hook: the whole file system is read-only but a private /tmp, and kill(-1)
    reaches only the sandbox's own PID namespace (a sibling sandbox keeps running)."""
    marker = f"opensloth-escape-{uuid.uuid4().hex}"
    writes = textwrap.dedent(f"""
        import os
        results = []
        for path in ('/tmp/{marker}', '/var/tmp/{marker}', '/dev/shm/{marker}', {os.getcwd()!r} + '/{marker}'):
            try:
                open(path, 'w').write('x')
                results.append('wrote')
            except OSError as exc:
                results.append(exc.errno)
        print(results, os.listdir('/tmp'))""")
    result = run_python(writes, limits=LIMITS, audit_hook=False)
    assert result.ok, result
    results = ast.literal_eval(result.stdout[:result.stdout.index("]") + 1])
    # /tmp is private and writable; /var/tmp and /dev/shm are read-only. The test's own directory is
    # read-only too, or absent when it lies under /tmp (CI clones into /tmp/ci): the private /tmp covers it.
    assert results[:3] == ["wrote", errno.EROFS, errno.EROFS], result
    assert results[3] in (errno.EROFS, errno.ENOENT), result
    assert _traces(marker) == []
    box: dict = {}
    sibling = threading.Thread(target=lambda: box.update(r=run_python("import time\ntime.sleep(1.5)\nprint('alive')",
                                                                        limits=LIMITS, audit_hook=False)))
    sibling.start()
    time.sleep(0.3)
    killer = run_python("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n"
                        "    pass\nprint('after')", limits=LIMITS, audit_hook=False)
    sibling.join()
    assert killer.stdout == "after\n" and box["r"].stdout == "alive\n", (killer, box)


UNPRIVILEGED = r'''
import importlib.util, json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
spec = importlib.util.spec_from_file_location("sb", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
sys.modules["sb"] = sb
spec.loader.exec_module(sb)
port, marker = int(sys.argv[2]), sys.argv[3]
out = {"isolated": sb.sandbox_isolated(), "level": sb.sandbox_level()}
if out["isolated"]:
    r = sb.run_python("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n"
                      "    pass\nprint(os.getpid(), os.getuid())", audit_hook=False)
    out["kill"] = r.stdout
    r = sb.run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", audit_hook=False)
    out["net"] = r.stderr.strip().splitlines()[-1]
    r = sb.run_python(f"import os\nos.mkfifo('/tmp/{marker}')\nopen('/var/tmp/{marker}', 'w')", audit_hook=False)
    out["files"] = r.stderr.strip().splitlines()[-1]
print(json.dumps(out))
'''


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not Path("/usr/bin/setpriv").exists(),
                    reason="needs root (to become nobody with setpriv) and /usr/bin/python3")
def test_unprivileged_caller_gets_user_namespaces_or_a_plain_warning():
    """The sandbox run by a non-root user (nobody, via setpriv): with user namespaces, kill(-1),
    the network and the file system stay contained; without, the one-time warning says so."""
    listener = Listener()
    marker = f"opensloth-escape-{uuid.uuid4().hex}"
    # nobody gets its own readable copies: the checkout may lie where only its owner can read (/root, mode 700).
    script = Path(tempfile.mkdtemp(prefix="opensloth-unprivileged-", dir="/tmp")) / "unprivileged.py"
    script.parent.chmod(0o755)
    script.write_text(UNPRIVILEGED)
    module = script.parent / "sandbox.py"  # self-contained: it imports only the standard library
    shutil.copyfile(sandbox_module.__file__, module)
    for path in (script, module):
        path.chmod(0o644)
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-I",
             str(script), str(module), str(listener.port), marker],
            capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}, cwd="/")
        time.sleep(0.3)
        assert listener.received == []
    finally:
        listener.close()
        shutil.rmtree(script.parent)
    assert proc.returncode == 0, proc.stderr
    out = __import__("json").loads(proc.stdout.splitlines()[-1])
    if out["isolated"]:
        assert "user namespace, no capabilities" in out["level"]
        assert out["kill"].split()[0] == "2"  # its own PID namespace: kill(-1) had no one to reach
        assert "Network is unreachable" in out["net"]
        assert "Read-only file system" in out["files"] or "PermissionError" in out["files"], out
        assert _traces(marker) == []
        assert "unavailable" not in proc.stderr
    else:
        assert proc.stderr.count("Linux namespaces are unavailable") == 1, proc.stderr
        assert "NOT isolated from the network" in proc.stderr


@pytest.mark.parametrize(("env", "why"), [({"OPENSLOTH_SANDBOX_NAMESPACES": "0"}, "turned off by"),
                                          ({"PATH": "/nonexistent"}, "`unshare` is not installed")],
                         ids=["turned-off", "no-unshare"])
def test_without_namespaces_one_plain_warning_names_what_is_not_isolated(env, why):
    code = ("import logging\nlogging.basicConfig(format='%(message)s')\n"
            "from opensloth.rewards.sandbox import run_python, sandbox_level\n"
            "print(run_python('print(1)').stdout.strip(), run_python('print(2)').stdout.strip())\n"
            "print(sandbox_level())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "1 2"
    assert "rlimits" in proc.stdout and "no namespaces" in proc.stdout and why in proc.stdout
    assert proc.stderr.count("Linux namespaces are unavailable") == 1, proc.stderr
    for words in ("NOT isolated from the network", "other processes", "file system"):
        assert words in proc.stderr


@requires_namespaces
def test_answers_in_the_trainers_working_directory_are_hidden(reward, monkeypatch):
    """A dataset with the expected outputs, world-readable, in the directory the trainer runs from:
    the sandbox sees that directory empty, so a completion cannot look its answers up."""
    workdir = Path(tempfile.mkdtemp(prefix="opensloth-trainer-", dir="/var/tmp"))
    try:
        workdir.chmod(0o755)
        (workdir / "tasks.jsonl").write_text(__import__("json").dumps({"tests": STDIN_TESTS}) + "\n")
        (workdir / "tasks.jsonl").chmod(0o644)
        monkeypatch.chdir(workdir)
        attack = fenced(f"""
            import json
            given = input()
            for line in open({str(workdir / "tasks.jsonl")!r}):
                for test in json.loads(line)["tests"]:
                    if test["input"].strip() == given.strip():
                        print(test["output"])""")
        assert _score(reward, [attack, GOOD["stdin"]], STDIN_TESTS) == [0.2, 1.0]
    finally:
        shutil.rmtree(workdir)
