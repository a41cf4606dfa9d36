"""Start one worker process per device and watch them until all succeed or one fails.

Each worker runs `python -m opensloth.launch.worker` in its own session (process group), so
the launcher can stop a worker together with anything it spawned, and a terminal Ctrl-C
reaches only the launcher, which then stops every worker itself: SIGTERM first (the recipes
finish the step, save a checkpoint and exit), SIGKILL on a second Ctrl-C. SIGTERM to the
launcher does the same, with at most INTERRUPT_GRACE_SECONDS for the checkpoint.

Failure policy: the first worker to exit non-zero (or be killed) fails the job. The others
get SIGTERM, then SIGKILL after a grace period; the launcher raises `WorkerFailed` naming the
rank and its error (from the worker's error file, else its exit signal) and shows that rank's
last output lines. Workers also die with the launcher (PR_SET_PDEATHSIG, see worker.py), and
every collective has a timeout, so no process outlives a failed job. A worker that exits 130 after
saving a checkpoint (it got SIGTERM, or Ctrl-C in its tmux pane) ends the job with
`TrainingStopped` instead (`worker_exit_error`).

Output (launcher "process"): every line is prefixed with its rank; rank 0's lines are shown
live, the other ranks' are kept (last lines) and shown only if that rank fails.
Launcher "tmux": one pane per worker in a new tmux session; the launcher watches exit-code
files written by each pane.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from opensloth.errors import TrainingStopped, UserError

# Set by the launcher in each worker's environment (read by opensloth.launch.worker). Defined here,
# not in worker.py, so that importing the package does not import the `-m` entry module itself.
ERROR_FILE_ENV = "OPENSLOTH_ERROR_FILE"
PARENT_PID_ENV = "OPENSLOTH_PARENT_PID"
LAUNCHED_ENV = "OPENSLOTH_LAUNCHED"  # set by both our launchers; absent under torchrun

Device = Union[int, str]  # a GPU id as the user sees it, or "cpu"
TAIL_LINES = 40
GRACE_SECONDS = 5.0  # after a failure: the survivors only need to notice and exit
INTERRUPT_GRACE_SECONDS = 60.0  # SIGTERM to the launcher: time to finish the step and checkpoint


class WorkerFailed(UserError):
    """A worker raised or died; the message names the rank and its error.

    A UserError so the CLI prints this one message (the worker's own traceback is already
    shown above it) instead of the launcher's traceback, which says nothing about the cause.
    """


@dataclass
class Worker:
    rank: int
    proc: subprocess.Popen
    error_file: Path
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    reader: Optional[threading.Thread] = None
    role: str = "worker"  # or "rollout worker" (--rollout-devices)


def free_port() -> int:
    """A TCP port free right now on this machine (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_master_port(port: Optional[int]) -> None:
    """Refuse a --master-port something on this machine already listens on, before any worker starts.

    The rendezvous store of rank 0 listens on it; taken, the workers would fail with a raw
    "address already in use" from inside torch.distributed after the data was prepared.

    Raises:
        UserError: names the port and the fix.
    """
    if port is None:
        return
    with socket.socket() as sock:
        # SO_REUSEADDR as the store sets it: a port in TIME_WAIT is usable, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as exc:
            raise UserError(f"--master-port {port} is already in use on this machine ({exc.strerror}). "
                            "Pick another port, or leave --master-port unset to use a free one.") from None


def worker_env(rank: int, world_size: int, device: Device, port: int, error_file: Path,
               cpu_sharers: Optional[int] = None) -> dict[str, str]:
    """The environment of one worker: torchrun's variables plus its pinned device.

    On the CPU the cores are split among `cpu_sharers` processes (default `world_size`): the processes that
    compute at the same time. More OpenMP threads than cores makes every matmul wait on the others.
    """
    env = dict(os.environ)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
        **{PARENT_PID_ENV: str(os.getpid()), ERROR_FILE_ENV: str(error_file), LAUNCHED_ENV: "1"},
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Share the cores instead of every worker starting one thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (cpu_sharers or world_size))))
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",")] if visible else None
        env["CUDA_VISIBLE_DEVICES"] = ids[int(device)] if ids else str(device)
    return env


def worker_command(recipe: str, config_path: Path, prepared_path: Path) -> list[str]:
    return [sys.executable, "-m", "opensloth.launch.worker", "--recipe", recipe,
            "--config", str(config_path), "--prepared", str(prepared_path)]


def _pump(worker: Worker, show: bool, lock: threading.Lock) -> None:
    """Copy a worker's output lines, prefixed with its rank, to our stdout (if `show`) and its tail."""
    assert worker.proc.stdout is not None
    for raw in iter(worker.proc.stdout.readline, b""):
        line = f"[rank{worker.rank}] " + raw.decode(errors="replace").rstrip("\n")
        worker.tail.append(line)
        if show:
            with lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: list[subprocess.Popen], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every live worker's process group, then SIGKILL whatever is left after `grace` s."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        # Also sweeps grandchildren left in the group after the worker itself exited.
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def stop_gracefully(procs: list[subprocess.Popen], timeout: Optional[float]) -> None:
    """Ctrl-C: ask the workers to stop (SIGTERM: the recipes save a checkpoint at the end of the
    step, then exit), wait for them, and kill them if a second Ctrl-C comes or `timeout` passes."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    sys.stderr.write("Stopping the workers: they save a checkpoint after the current step "
                     "(Ctrl-C again to kill them now).\n")
    sys.stderr.flush()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        pass
    finally:
        stop_all(procs, grace=0.0)


def describe_failure(rank: int, returncode: int, error_file: Path, role: str = "worker") -> tuple[str, bool]:
    """(one-line description of why `rank` failed, whether it was a user error); `role`: "worker", or
    "rollout worker" for a --rollout-devices rank."""
    if error_file.is_file():
        try:
            record = json.loads(error_file.read_text())
            if record.get("user_error"):
                return record["message"], True
            return f"{role} rank {rank} failed: {record['type']}: {record['message']}", False
        except (OSError, ValueError, KeyError):
            pass
    if returncode > 128 and returncode - 128 in signal.valid_signals():  # a shell's report (tmux)
        returncode = 128 - returncode
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"{role} rank {rank} was killed by {name}{hint}", False
    return f"{role} rank {rank} exited with status {returncode}", False


def _stopped_message(error_file: Path) -> Optional[str]:
    """The message of a worker that stopped on a signal after saving a checkpoint, else None."""
    try:
        record = json.loads(error_file.read_text())
    except (OSError, ValueError):
        return None
    return record.get("message") if record.get("type") == "TrainingStopped" else None


def worker_exit_error(rank: int, returncode: int, error_file: Path, aftermath: str,
                      role: str = "worker") -> Exception:
    """What the launcher raises when `rank` exited non-zero (both launchers use it).

    TrainingStopped when the worker stopped on Ctrl-C/SIGTERM after saving a checkpoint (exit 130);
    UserError for a mistake the user can fix; else WorkerFailed, its message followed by `aftermath`
    (what the launcher did about the other workers).
    """
    stopped = _stopped_message(error_file) if returncode == 130 else None
    if stopped is not None:
        return TrainingStopped(stopped)
    message, user_error = describe_failure(rank, returncode, error_file, role)
    return UserError(message) if user_error else WorkerFailed(f"{message}. {aftermath}")


def _raise_if_stopped(workers: list[Worker]) -> None:
    """After Ctrl-C: if rank 0 saved a checkpoint and stopped, say so (where, and how to go on)."""
    message = _stopped_message(workers[0].error_file) if workers else None
    if message is not None:
        raise TrainingStopped(message) from None


def _exit_on_sigterm(signum, frame):
    """SIGTERM to the launcher: leave through the `finally` that stops the workers."""
    raise SystemExit(128 + signum)


def rollout_env(env: dict[str, str], train_world: int, rollout_world: int, link_port: int,
                rollout_index: Optional[int]) -> dict[str, str]:
    """`env` plus what --rollout-devices adds (opensloth.recipes.grpo_rollout): the link's port and sizes, and
    for a rollout worker its index (its job rank is train_world + index)."""
    from opensloth.recipes.grpo_rollout import (
        LINK_PORT_ENV,
        ROLLOUT_RANK_ENV,
        ROLLOUT_WORLD_ENV,
        TRAIN_WORLD_ENV,
    )

    env = dict(env, **{LINK_PORT_ENV: str(link_port), TRAIN_WORLD_ENV: str(train_world),
                       ROLLOUT_WORLD_ENV: str(rollout_world)})
    if rollout_index is not None:
        env[ROLLOUT_RANK_ENV] = str(rollout_index)
        env["WORLD_SIZE"] = str(train_world)  # the trainers' group, which a rollout worker does not join
    return env


def run_workers(recipe: str, config_path: Path, prepared_path: Path, devices: list[Device],
                launcher: str = "process", master_port: Optional[int] = None,
                finish_timeout: float = 600.0, rollout_devices: Optional[list[Device]] = None,
                rollouts_overlap: bool = False) -> None:
    """Run one worker per device to completion; raise WorkerFailed as soon as one fails.

    Args:
        recipe: "sft" or "grpo".
        config_path: the resolved config YAML the workers read.
        prepared_path: the PreparedDataset directory.
        devices: one entry per worker: a GPU id (as visible to the launcher) or "cpu".
        launcher: "process" (child processes, rank-prefixed output) or "tmux" (one pane each).
        master_port: rendezvous port; default a free one.
        finish_timeout: seconds the others may take to exit after the first worker exited cleanly.
        rollout_devices: --rollout-devices, one entry per rollout worker (job ranks after the trainers'),
            watched like the training workers.
        rollouts_overlap: the rollout workers generate while the trainers train (--max-staleness >= 1), so
            CPU workers split the cores among all of them, not only among the trainers.
    """
    if launcher == "tmux":
        return run_workers_tmux(recipe, config_path, prepared_path, devices, master_port)
    train_world, rollouts = len(devices), list(rollout_devices or [])
    world_size, port = train_world + len(rollouts), master_port or free_port()
    # The rollout link's store (opensloth.recipes.grpo_rollout), served from here: it outlives every worker,
    # so a worker that finished never takes it away from one still watching its peers' heartbeats.
    link_store = _serve_link_store() if rollouts else None
    link_port = link_store.port if link_store is not None else 0
    errors_dir = Path(tempfile.mkdtemp(prefix="opensloth-workers-"))
    workers: list[Worker] = []
    exits: "collections.deque[tuple[int, int]]" = collections.deque()
    exited = threading.Event()
    lock = threading.Lock()
    previous_term = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for rank, device in enumerate(devices + rollouts):
            error_file = errors_dir / f"rank{rank}.json"
            # Rollout workers that generate while the trainers train (--max-staleness >= 1) share the cores
            # with them; at K = 0 they take turns, and each keeps the trainers' thread count (the same
            # numerics as the colocated run, which K = 0 reproduces).
            sharers = sum(d == "cpu" for d in devices + rollouts) if rollouts_overlap else None
            env = worker_env(rank, train_world, device, port, error_file, cpu_sharers=sharers)
            if rollouts:
                env = rollout_env(env, train_world, len(rollouts), link_port,
                                  rank - train_world if rank >= train_world else None)
            proc = subprocess.Popen(
                worker_command(recipe, config_path, prepared_path),
                env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            worker = Worker(rank, proc, error_file, role="rollout worker" if rank >= train_world else "worker")
            worker.reader = threading.Thread(target=_pump, args=(worker, rank == 0, lock), daemon=True)
            worker.reader.start()
            workers.append(worker)

            def wait(w: Worker = worker) -> None:
                code = w.proc.wait()
                w.reader.join(timeout=2)  # its last lines, e.g. the traceback, before we report
                exits.append((w.rank, code))
                exited.set()

            threading.Thread(target=wait, daemon=True).start()

        done: set[int] = set()
        straggler_deadline = None
        while len(done) < world_size:
            exited.wait(timeout=0.5)
            exited.clear()
            while exits:
                rank, code = exits.popleft()
                done.add(rank)
                if code != 0:
                    _fail(workers, rank, code, lock)
                # The workers finish together (the last step ends in a collective): one that is still
                # running long after another finished is stuck, not slow.
                straggler_deadline = straggler_deadline or time.monotonic() + finish_timeout
            if straggler_deadline is not None and time.monotonic() > straggler_deadline:
                stuck = min(set(range(world_size)) - done)
                stop_all([w.proc for w in workers])
                raise WorkerFailed(f"worker rank {stuck} did not finish within {finish_timeout:.0f} s after "
                                   f"rank {min(done)} did; all workers were stopped.")
    except KeyboardInterrupt:
        stop_gracefully([w.proc for w in workers], timeout=None)
        _raise_if_stopped(workers)
        raise
    except SystemExit:  # SIGTERM to the launcher
        stop_gracefully([w.proc for w in workers], timeout=INTERRUPT_GRACE_SECONDS)
        _raise_if_stopped(workers)
        raise
    finally:
        stop_all([w.proc for w in workers])
        if in_main:
            signal.signal(signal.SIGTERM, previous_term)
        shutil.rmtree(errors_dir, ignore_errors=True)


def _serve_link_store():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _fail(workers: list[Worker], rank: int, code: int, lock: threading.Lock) -> None:
    """Stop the others, show the failing rank's last lines (rank 0's were shown live), raise."""
    stop_all([w.proc for w in workers])
    worker = workers[rank]
    # TrainingStopped: SIGTERM reached the workers (not us), and they saved and stopped.
    error = worker_exit_error(rank, code, worker.error_file, "The other workers were stopped.", worker.role)
    if rank != 0 and worker.tail and not isinstance(error, TrainingStopped):
        with lock:
            sys.stderr.write("\n".join(worker.tail) + "\n")
            sys.stderr.flush()
    raise error


def run_workers_tmux(recipe: str, config_path: Path, prepared_path: Path, devices: list[Device],
                     master_port: Optional[int] = None) -> None:
    """One tmux pane per worker (tiled); watch exit-code files; kill the session on failure."""
    if shutil.which("tmux") is None:
        raise UserError("--launcher tmux needs tmux, which is not installed here. "
                        "Install it (apt-get install tmux) or use --launcher process.")
    world_size, port = len(devices), master_port or free_port()
    state = Path(tempfile.mkdtemp(prefix="opensloth-tmux-"))
    session = f"opensloth-{os.getpid()}"
    for rank, device in enumerate(devices):
        env = worker_env(rank, world_size, device, port, state / f"rank{rank}.json")
        env.pop(PARENT_PID_ENV)  # the pane's shell is the worker's parent, not us
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in
                           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES", ERROR_FILE_ENV, LAUNCHED_ENV)
                           if k in env)
        if "OMP_NUM_THREADS" in env:
            exports += f" OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
        # The pane keeps its shell after the worker exits, so its output stays readable.
        cmd = (f"env {exports} {shlex.join(worker_command(recipe, config_path, prepared_path))}; "
               f"echo $? > {shlex.quote(str(state / f'rank{rank}.exit'))}; exec $SHELL")
        if rank == 0:
            subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd],
                           check=True)
        else:
            subprocess.run(["tmux", "split-window", "-t", session, cmd], check=True)
            subprocess.run(["tmux", "select-layout", "-t", session, "tiled"], check=True)
    sys.stdout.write(f"Workers run in tmux session {session}: attach with `tmux attach -t {session}`.\n")
    sys.stdout.flush()
    try:
        while True:
            codes = {}
            for rank in range(world_size):
                exit_file = state / f"rank{rank}.exit"
                if exit_file.is_file() and exit_file.read_text().strip():
                    codes[rank] = int(exit_file.read_text().strip())
            failed = [r for r, c in codes.items() if c != 0]
            if failed:
                rank = failed[0]  # (exit 130 after Ctrl-C in a pane: TrainingStopped)
                raise worker_exit_error(rank, codes[rank], state / f"rank{rank}.json",
                                        f"The other workers were stopped; tmux session {session} closed.")
            if len(codes) == world_size:
                return
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
