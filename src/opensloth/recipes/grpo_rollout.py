"""Rollout workers on their own devices (--rollout-devices): phases 1-4 of GRPO away from the trainers.

Layout. The launcher starts T training workers (--devices) and R rollout workers (--rollout-devices) as
one job: ranks 0..T-1 train, ranks T..T+R-1 roll out, and the launcher's failure policy (the first
worker to die ends the job, naming its rank; no process outlives it) covers both. The training workers
keep their own process group (their all-reduces are exactly the colocated run's); a second gloo group,
the *link*, joins all T+R ranks (link rank = job rank) for the hand-offs below. Its timeout is
--collective-timeout. Its store is served by the launcher, which outlives every worker.

Under torchrun (several machines) the same roles come from OPENSLOTH_ROLE=rollout, set in the
environment of the processes that roll out (e.g. on one node); `assign_torchrun_roles` trades every
rank's role through torchrun's own store (served by its agent) and gives each process the environment
the launcher would have: trainers are renumbered 0..T-1 in torchrun-rank order, rollout workers T..T+R-1.

Liveness. Every process of the layout runs a `Heartbeat`: a thread that bumps its counter in the link's
store every BEAT_SECONDS and watches the peers it depends on (a trainer: its rollout worker; a rollout
worker: the trainers it serves and training rank 0, which sends the weights). A peer whose counter has
not moved for LOST_AFTER_SECONDS (stopped, hung holding the interpreter, its machine gone) ends the job
from the watcher, naming the peer; a peer that failed says so in the store, and its watchers end at once
with its error. This holds under torchrun too, where no launcher of ours watches the processes.

Rollout worker j produces for the training ranks r with r % R == j: for each it runs the recipe's own
`GRPORecipe.produce` (the same shard, prompt sampler, engine, rewards and advantages as the colocated
run) and sends the result (`Produced`, pickled into a uint8 tensor) to rank r, tagged with the policy
version that generated it.

Versions. Version v is the policy after GRPO step v (the start, or the step resumed from, is
start_step - 1). Batch m is generated from version max(start_step - 1, m - 1 - K), K = --max-staleness:
K = 0 is synchronous (batch m from the policy batch m - 1 trained); K >= 1 lets the rollout workers run
K batches ahead while the trainers train. A batch whose staleness (m - 1 - version) exceeds K cannot
be produced by this schedule; the trainer checks it anyway and refuses to train on it.

Weight sync. At start and after step v (for each v a later batch needs), training rank 0 sends
[version, numel] and the trainable tensors flattened (LoRA A/B; every weight with --full-finetune)
to every rollout worker (isend: the trainer only waits for it before the next sync). Seconds and
bytes are logged (rollout/weight_sync_seconds, rollout/weight_sync_bytes).

Randomness. Each training rank sends its torch RNG state once, at start; the rollout worker generates
for rank r from that stream and sends the state after generating back with the batch, which the
trainer adopts (so its checkpoints hold it, and --resume hands it back). When the training step draws
no random numbers (--lora-dropout 0, no dropout in the model), the colocated run's generator sees
exactly this stream, so K = 0 reproduces it, also across a --resume (CPU; a CUDA rollout device
draws from its own CUDA generator, which is not shared). With dropout the trainer's draws come from
the same stream but no longer interleave with generation as in the colocated run: the run is
statistically the same, not bit-for-bit.

Off-policy correction (K >= 1): the rollout worker also computes the log-probs of the sampled tokens
under its (behaviour) policy; the trainer treats them as a separate sampler's log-probs, i.e. the
truncated importance-sampling weights of the vLLM path (--vllm-importance-sampling*,
docs/GRPO_TRAINING.md "Rollout devices").
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from opensloth.distributed import WorkerContext
from opensloth.errors import UserError

LINK_PORT_ENV = "OPENSLOTH_LINK_PORT"
TRAIN_WORLD_ENV = "OPENSLOTH_TRAIN_WORLD"
ROLLOUT_WORLD_ENV = "OPENSLOTH_ROLLOUT_WORLD"
ROLLOUT_RANK_ENV = "OPENSLOTH_ROLLOUT_RANK"  # set in rollout workers only: their index j
ROLE_ENV = "OPENSLOTH_ROLE"  # under torchrun, set by the user: "rollout" on the rollout ranks (default "train")

BEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 15.0  # well inside the 30 s, with the launcher's 5 s stop grace; a GC pause is ms

TAG_HEADER, TAG_WEIGHTS, TAG_RNG, TAG_SIZE, TAG_BATCH = 1, 2, 3, 4, 5


def in_rollout_layout() -> bool:
    """This process is part of a job with rollout workers (set up by the launcher or `assign_torchrun_roles`)."""
    return TRAIN_WORLD_ENV in os.environ


def rollout_rank() -> Optional[int]:
    """This process's rollout index j when it is a rollout worker, else None."""
    value = os.environ.get(ROLLOUT_RANK_ENV)
    return None if value is None else int(value)


def link_rank() -> int:
    """This process's rank in the link: its training rank, or T + j for rollout worker j."""
    j = rollout_rank()
    return int(os.environ["RANK"]) if j is None else int(os.environ[TRAIN_WORLD_ENV]) + j


def _link_store(timeout_s: float) -> tuple[Any, str]:
    """A client of the link's store, served by os-train's launcher (OPENSLOTH_LINK_PORT) or, under
    torchrun, by its agent (MASTER_ADDR:MASTER_PORT); and the key prefix of this (re)start of the job."""
    if LINK_PORT_ENV in os.environ:
        host, port = "127.0.0.1", int(os.environ[LINK_PORT_ENV])
    else:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    return store, f"opensloth-rollout/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def open_link(link_rank: int, link_world: int, timeout_s: int) -> Any:
    """The gloo group of every training and rollout rank."""
    store, prefix = _link_store(timeout_s)
    timeout = timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), link_rank, link_world, timeout)


def _wait(work: Any, timeout_s: int, what: str) -> None:
    if not work.wait(timedelta(seconds=timeout_s)):
        raise RuntimeError(f"rollout link: {what} did not complete within {timeout_s} s")


def post_object(link: Any, obj: Any, dst: int) -> tuple[Any, ...]:
    """Start sending `obj` (pickled) to `dst` without waiting for it to be received; returns the pending
    works and the tensors they read (keep them alive until the works complete). Gloo delivers the posted
    sends of one tag to one peer in order, so several may be pending at once."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return link.send([size], dst, TAG_SIZE), link.send([payload], dst, TAG_BATCH), size, payload


def recv_object(link: Any, src: int, timeout_s: int) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    _wait(link.recv([size], src, TAG_SIZE), timeout_s, f"receiving from rank {src}")
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    _wait(link.recv([payload], src, TAG_BATCH), timeout_s, f"receiving from rank {src}")
    return pickle.loads(payload.numpy().tobytes())


def flatten(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The trainable tensors as one float32 vector (a copy: training may go on while it is sent)."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params])


def load_flat(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.device, p.dtype))
            offset += n


def needed_version(step: int, start_step: int, max_staleness: int) -> int:
    """The policy version batch `step` is generated from (see the module docstring)."""
    return max(start_step - 1, step - 1 - max_staleness)


class TrainerLink:
    """A training worker's side: receives its batches, and (rank 0) sends the weights."""

    def __init__(self, cfg: Any, ctx: WorkerContext, params: list[torch.nn.Parameter], *, start_step: int,
                 total_steps: int) -> None:
        if not in_rollout_layout():
            raise UserError("--rollout-devices: no rollout workers were started for this process. os-train "
                            "starts them; under torchrun leave --rollout-devices unset and set OPENSLOTH_ROLE=rollout "
                            "on the rollout ranks (docs/multi_gpu.md).")
        self.cfg, self.ctx, self.params = cfg, ctx, params
        self.timeout = cfg.distributed.collective_timeout
        self.train_world = int(os.environ[TRAIN_WORLD_ENV])
        self.rollout_world = int(os.environ[ROLLOUT_WORLD_ENV])
        self.k = cfg.grpo.max_staleness
        self.start_step, self.total_steps = start_step, total_steps
        self.link = open_link(ctx.rank, self.train_world + self.rollout_world, self.timeout)
        self.source = self.train_world + ctx.rank % self.rollout_world  # my rollout worker's rank
        self.pending: list[Any] = []
        self.staleness_sum, self.steps, self.dropped = 0.0, 0, 0
        self.sync_seconds, self.sync_bytes = 0.0, 0
        self.receive_start, self.idle = 0.0, 0.0
        if ctx.rank == 0:
            self.send_weights(start_step - 1)
            self.wait_pending()
        _wait(self.link.send([torch.get_rng_state()], self.source, TAG_RNG), self.timeout, "sending the RNG state")

    def send_weights(self, version: int) -> None:
        """Rank 0: [version, numel] and the trainable tensors to every rollout worker (asynchronously)."""
        start = time.perf_counter()
        self.wait_pending()
        flat = flatten(self.params)
        header = torch.tensor([version, flat.numel()], dtype=torch.int64)
        for j in range(self.rollout_world):
            dst = self.train_world + j
            self.pending += [self.link.send([header], dst, TAG_HEADER), self.link.send([flat], dst, TAG_WEIGHTS)]
        self.pending_tensors = (header, flat)  # alive until the sends complete
        self.sync_seconds = time.perf_counter() - start
        self.sync_bytes = flat.numel() * flat.element_size() * self.rollout_world

    def wait_pending(self) -> None:
        for work in self.pending:
            _wait(work, self.timeout, "sending the weights to the rollout workers")
        self.pending = []

    def receive(self, step: int) -> Any:
        """This worker's batch of `step` from its rollout worker; refuses one more than K versions old."""
        self.receive_start = time.perf_counter()
        produced = recv_object(self.link, self.source, self.timeout)
        self.idle = time.perf_counter() - self.receive_start
        staleness = step - 1 - produced.version
        if staleness > self.k:  # the schedule never makes one; never train on it if it did
            self.dropped += 1
            raise RuntimeError(f"rollout rank {self.source} sent a batch of version {produced.version} for step "
                               f"{step}: {staleness} versions old, more than --max-staleness {self.k}")
        self.staleness = float(staleness)
        # The generator where the colocated run's would be after generating: what a checkpoint saves, so
        # --resume continues the stream (the rollout worker gets it back at start).
        torch.set_rng_state(produced.rng_state)
        self.staleness_sum += staleness
        self.steps += 1
        return produced

    def after_update(self, step: int, produced: Any) -> dict[str, float]:
        """After step `step`'s optimizer steps: rank 0 syncs the weights if a later batch needs them;
        returns the link's metrics of the step (the same keys on every worker)."""
        self.sync_seconds, self.sync_bytes = 0.0, 0
        if self.ctx.rank == 0 and step + 1 + self.k <= self.total_steps:  # batch step + 1 + K is made from it
            self.send_weights(step)
        busy = max(time.perf_counter() - self.receive_start, 1e-9)
        return {
            "rollout/staleness": self.staleness,
            "rollout/staleness_mean": self.staleness_sum / max(1, self.steps),
            "rollout/samples_dropped": float(self.dropped),
            "rollout/trainer_idle_fraction": self.idle / busy,
            "rollout/rollout_idle_fraction": produced.rollout_idle_fraction,
            "rollout/weight_sync_seconds": self.sync_seconds,
            "rollout/weight_sync_bytes": float(self.sync_bytes),
        }

    def close(self) -> None:
        self.pending = []  # an unfinished send to a rollout worker that has exited: nothing waits on it


def run_rollout_worker(cfg: Any, prepared: Any, device: torch.device) -> None:
    """A rollout worker's life: weights and RNG states in, one batch per step and served rank out.

    Ctrl-C / SIGTERM (the launcher stopping the job) does not stop it at once: the training workers
    finish their step (which may still need a batch or send weights) and save a checkpoint; when they
    have exited, the link breaks and this worker leaves quietly.
    """
    import signal

    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    try:
        _serve(cfg, prepared, device)
    except Exception:
        if not stopping:
            raise


def _serve(cfg: Any, prepared: Any, device: torch.device) -> None:
    from opensloth.recipes.grpo import Batch, GRPORecipe

    j = int(os.environ[ROLLOUT_RANK_ENV])
    train_world, rollout_world = int(os.environ[TRAIN_WORLD_ENV]), int(os.environ[ROLLOUT_WORLD_ENV])
    timeout, k = cfg.distributed.collective_timeout, cfg.grpo.max_staleness
    served = [r for r in range(train_world) if r % rollout_world == j]
    producers: dict[int, GRPORecipe] = {}
    for r in served:
        ctx = WorkerContext(rank=r, world_size=train_world, local_rank=r, device=device, prepared_data_path=prepared)
        producers[r] = GRPORecipe(cfg, ctx)
        producers[r].setup_rollout(share_from=producers[served[0]] if r != served[0] else None)
    first = producers[served[0]]
    link = open_link(train_world + j, train_world + rollout_world, timeout)

    def receive_weights() -> int:
        header = torch.zeros(2, dtype=torch.int64)
        _wait(link.recv([header], 0, TAG_HEADER), timeout, "receiving the weights from training rank 0")
        flat = torch.empty(int(header[1]), dtype=torch.float32)
        _wait(link.recv([flat], 0, TAG_WEIGHTS), timeout, "receiving the weights from training rank 0")
        load_flat(first.params, flat)
        return int(header[0])

    version = receive_weights()
    start_step = version + 1
    rng = {}
    for r in served:
        state = torch.get_rng_state()
        _wait(link.recv([state], r, TAG_RNG), timeout, f"receiving the RNG state of rank {r}")
        rng[r] = state
        for _ in range(start_step - 1):  # the sampler's position, as a resumed trainer replays its own
            next(producers[r].sampler)
    # Batches handed over but not yet taken: at most K + 1 per trainer (batch m waits for version
    # m - 1 - K, which exists only once the trainer has taken batch m - 1 - K and trained on it), so with
    # K >= 2 batches n+1 .. n+K are all generated while batch n trains.
    in_flight: list[tuple[Any, ...]] = []
    cycle_start, idle = time.perf_counter(), 0.0
    for step in range(start_step, first.total_steps + 1):
        wait_start = time.perf_counter()
        while version < needed_version(step, start_step, k):
            version = receive_weights()
        idle += time.perf_counter() - wait_start
        for r in served:
            torch.set_rng_state(rng[r])
            produced = producers[r].produce(step)
            rng[r] = torch.get_rng_state()
            ro = produced.rollout
            if k > 0 and ro.sampler_log_probs is None:  # the behaviour policy's log-probs (vLLM reports its own)
                batch = Batch(input_ids=ro.input_ids.to(device), attention_mask=ro.attention_mask.to(device),
                              completion_mask=ro.completion_mask.to(device), advantages=produced.advantages)
                with torch.no_grad():
                    ro.sampler_log_probs = producers[r].log_probs(batch, first.model, with_entropy=False)[0].cpu()
            produced.version, produced.rng_state = version, rng[r]
            _to_cpu(produced)
            now = time.perf_counter()
            produced.rollout_idle_fraction = idle / max(now - cycle_start, 1e-9)
            cycle_start, idle = now, 0.0
            in_flight = [sent for sent in in_flight if not (sent[0].is_completed() and sent[1].is_completed())]
            in_flight.append(post_object(link, produced, r))
    for sent in in_flight:  # the last batches, until their trainers have taken them
        _wait(sent[0], timeout, "handing a batch over")
        _wait(sent[1], timeout, "handing a batch over")


def _to_cpu(produced: Any) -> None:
    """Every tensor of a batch on the CPU, for the gloo link (the trainer moves them to its device)."""
    for holder in (produced, produced.rollout):
        for name, value in vars(holder).items():
            if isinstance(value, torch.Tensor):
                setattr(holder, name, value.cpu())
    produced.adv_meta = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in produced.adv_meta.items()}



def rollout_refusal(cfg: Any) -> Optional[str]:
    """Why the rollout workers cannot serve this config (None when they can). Both layouts check it:
    the launcher before starting anything, `assign_torchrun_roles` under torchrun."""
    if cfg.grpo.reward_scaling == "batch":
        return ("--scale-rewards batch needs every worker's rewards of the step, which no single rollout worker "
                "has (use group or none)")
    return None


def assign_torchrun_roles(cfg: Any) -> None:
    """Under torchrun: the training and rollout ranks from every rank's OPENSLOTH_ROLE, traded through
    torchrun's store; then this process's environment as os-train's launcher would set it (trainers:
    RANK and WORLD_SIZE of the trainers' group, numbered in torchrun-rank order; rollout workers:
    OPENSLOTH_ROLLOUT_RANK). Without rollout ranks it changes nothing.

    Raises:
        UserError: an unknown role; a rollout role outside a GRPO torchrun job; --rollout-devices
            under torchrun; --max-staleness without rollout ranks; no training rank, more rollout
            ranks than training ranks, or a config the rollout workers cannot serve.
    """
    role = os.environ.get(ROLE_ENV, "train").strip().lower()
    if role not in ("train", "rollout"):
        raise UserError(f"{ROLE_ENV}={os.environ[ROLE_ENV]!r}: expected train or rollout.")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if cfg.recipe != "grpo" or world < 2 or not agent_store:
        if role == "rollout":
            raise UserError(f"{ROLE_ENV}=rollout: rollout ranks belong to a GRPO job started by torchrun, with "
                            f"training ranks beside them (this is recipe {cfg.recipe}, WORLD_SIZE {world}"
                            f"{'' if agent_store else ', not started by torchrun'}).")
        return
    g = cfg.grpo
    if g.rollout_devices:
        raise UserError(f"--rollout-devices {g.rollout_devices} is for os-train, which starts the rollout workers. "
                        f"Under torchrun leave it unset and set {ROLE_ENV}=rollout on the ranks that roll out.")
    store, prefix = _link_store(cfg.distributed.collective_timeout)
    store.set(f"{prefix}/role/{rank}", role)
    keys = [f"{prefix}/role/{r}" for r in range(world)]
    store.wait(keys)
    roles = [store.get(key).decode() for key in keys]
    trainers = [r for r in range(world) if roles[r] == "train"]
    rollouts = [r for r in range(world) if roles[r] == "rollout"]
    if not rollouts:
        if g.max_staleness:
            raise UserError(f"--max-staleness {g.max_staleness} needs rollout workers: under torchrun set "
                            f"{ROLE_ENV}=rollout on the ranks that roll out.")
        return
    if not trainers:
        raise UserError(f"every torchrun rank has {ROLE_ENV}=rollout: no rank is left to train.")
    if len(rollouts) > len(trainers):
        raise UserError(f"{len(rollouts)} ranks with {ROLE_ENV}=rollout for {len(trainers)} training ranks; each "
                        "rollout worker serves one or more training workers, so give at most as many.")
    why = rollout_refusal(cfg)
    if why:
        raise UserError(f"{ROLE_ENV}=rollout: {why}.")
    os.environ.update({TRAIN_WORLD_ENV: str(len(trainers)), ROLLOUT_WORLD_ENV: str(len(rollouts)),
                       "WORLD_SIZE": str(len(trainers))})
    if role == "train":
        os.environ["RANK"] = str(trainers.index(rank))
    else:
        os.environ[ROLLOUT_RANK_ENV] = str(rollouts.index(rank))


def link_peers() -> dict[int, str]:
    """The link ranks this process depends on, by name: a trainer's rollout worker; a rollout worker's
    trainers and training rank 0 (the weights' sender)."""
    train_world, rollout_world = int(os.environ[TRAIN_WORLD_ENV]), int(os.environ[ROLLOUT_WORLD_ENV])
    j = rollout_rank()
    if j is None:
        source = train_world + int(os.environ["RANK"]) % rollout_world
        return {source: f"rollout worker rank {source}"}
    served = {r for r in range(train_world) if r % rollout_world == j} | {0}
    return {r: f"training worker rank {r}" for r in sorted(served)}


class Heartbeat:
    """Liveness over the link's store (module docstring, "Liveness"): beats this rank's counter, watches
    its peers' counters and exit records, and calls `on_lost(message)` (which must end the process) when
    a peer failed or stopped answering. Started at process start, before any model loads; a peer is
    watched from its first beat, so a slow start is not a hang.
    """

    def __init__(self, rank: int, peers: dict[int, str], on_lost: Callable[[str], None]) -> None:
        self.rank, self.peers, self.on_lost = rank, dict(peers), on_lost
        self.store, prefix = _link_store(LOST_AFTER_SECONDS)
        self.prefix = f"{prefix}/heartbeat"
        self.lock = threading.RLock()  # the thread and `finish` share one client (`on_lost` may finish)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="opensloth-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching (a worker never needs to: it exits; for tests)."""
        self.stopped.set()
        self.thread.join(timeout=4 * BEAT_SECONDS)

    def finish(self, status: str) -> None:
        """Record how this process ends ("ok", "stopped", or its error): its watchers stop watching, or
        end with the error. Never raises (the process is leaving anyway)."""
        if not self.lock.acquire(timeout=2 * BEAT_SECONDS):  # the thread is stuck on a store that is gone
            return
        try:
            self.store.set(f"{self.prefix}/exit/{self.rank}", status)
        except Exception:  # noqa: BLE001 - the store is gone with the job
            pass
        finally:
            self.lock.release()

    def _run(self) -> None:
        seen: dict[int, tuple[int, float]] = {}  # peer -> (last counter value, when it last moved)
        while not self.stopped.is_set():
            try:
                with self.lock:
                    self.store.add(f"{self.prefix}/beat/{self.rank}", 1)
                    for peer, name in list(self.peers.items()):
                        exit_key = f"{self.prefix}/exit/{peer}"
                        if self.store.check([exit_key]):
                            status = self.store.get(exit_key).decode()
                            del self.peers[peer]
                            if status not in ("ok", "stopped"):
                                self.on_lost(f"{name} failed: {status}")
                            continue
                        count, now = self.store.add(f"{self.prefix}/beat/{peer}", 0), time.monotonic()
                        last = seen.get(peer)
                        if count and (last is None or count != last[0]):
                            seen[peer] = (count, now)
                        elif last is not None and now - last[1] > LOST_AFTER_SECONDS:
                            self.on_lost(f"{name} stopped answering: no heartbeat for {LOST_AFTER_SECONDS:.0f} s "
                                         "(stopped, hung, or its machine is unreachable)")
            except Exception as exc:  # noqa: BLE001 - the store itself is gone: so is the job
                self.on_lost(f"the rollout link's store stopped answering: {type(exc).__name__}: {exc}")
            self.stopped.wait(BEAT_SECONDS)
