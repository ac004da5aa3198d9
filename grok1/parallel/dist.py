"""Process groups from torchrun's environment, the 2-D mesh (tensor parallel within, expert parallel
across), start-up consistency checks and the heartbeat watchdog.

World rank r = e * T + t: TP group e holds ranks e*T .. e*T + T-1 (one node, fast links), EP group t
holds ranks t, t + T, ... (across nodes). Every rank runs the same forward on the same batch.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from grok1.model import Transformer
from grok1.config import ModelConfig
from grok1.parallel.ep import connect_ep, ep_plan, shard_ep
from grok1.parallel.tp import Plan, connect_tp, shard_tp, tp_plan


@dataclass(frozen=True)
class Mesh:
    rank: int
    tp: int
    ep: int
    world: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_mesh(tp: int, ep: int, backend: str = "gloo", timeout_s: float = 600.0) -> Mesh:
    """Join the job torchrun started (env RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build the TP x EP groups.
    Collectives that wait longer than timeout_s raise instead of hanging."""
    if tp < 1 or ep < 1:
        raise ValueError(f"--tp and --ep must be >= 1 (got --tp {tp} --ep {ep})")
    if not under_torchrun():
        raise ValueError(f"--tp {tp} --ep {ep} needs {tp * ep} processes: run under torchrun, e.g. "
                         f"torchrun --nproc-per-node {tp * ep} -m grok1 ... --tp {tp} --ep {ep}")
    world_size = int(os.environ["WORLD_SIZE"])
    if tp * ep != world_size:
        raise ValueError(f"--tp {tp} x --ep {ep} = {tp * ep} ranks, but torchrun started {world_size} "
                         f"(--nproc-per-node x --nnodes must equal --tp x --ep)")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return build_mesh(tp, ep)


def build_mesh(tp: int, ep: int) -> Mesh:
    """The TP and EP groups of an initialised default group of tp * ep ranks (every rank calls this)."""
    rank = dist.get_rank()
    tp_groups = [dist.new_group(list(range(e * tp, (e + 1) * tp))) for e in range(ep)]
    ep_groups = [dist.new_group(list(range(t, tp * ep, tp))) for t in range(tp)]
    return Mesh(rank, tp, ep, dist.group.WORLD, tp_groups[rank // tp], ep_groups[rank % tp])


def plans(name: str, shape: tuple[int, ...], fmt: str, cfg: ModelConfig, mesh: Mesh) -> list[Plan]:
    """How this rank slices checkpoint tensor `name` (its matrix stored as `fmt`): the expert axis first,
    then the tensor-parallel axis; [] when it keeps the whole tensor. What `shard` does to a model."""
    found = [ep_plan(name, shape, cfg, mesh.ep_rank, mesh.ep), tp_plan(name, shape, fmt, cfg, mesh.tp_rank, mesh.tp)]
    return [p for p in found if p is not None]


def shard(model: Transformer, mesh: Mesh) -> None:
    """Slice a finished unpacked model (or a `meta` one, before a sliced load) to this rank's share."""
    shard_tp(model, mesh.tp_rank, mesh.tp)
    shard_ep(model, mesh.ep_rank, mesh.ep)


def connect(model: Transformer, mesh: Mesh) -> None:
    """Install the collectives on a model holding this rank's slices: one all-reduce after each attention
    (TP group), one after each MoE (the TP group, the EP group, or the world when both split the experts)."""
    moe = mesh.world if mesh.tp > 1 and mesh.ep > 1 else (mesh.tp_group if mesh.tp > 1 else mesh.ep_group)
    connect_ep(model, mesh.ep_group, None if mesh.tp > 1 else moe)
    connect_tp(model, mesh.tp_group, moe)


def parallelize(model: Transformer, mesh: Mesh) -> Transformer:
    """shard + connect: a whole model in, this rank's part of it out (in place; call before pack_model)."""
    shard(model, mesh)
    connect(model, mesh)
    return model


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same(what: str, value: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise ValueError on every rank unless every rank of `group` passes the same `value` (e.g. a hash of
    the config and the checkpoint index): ranks started with different models must not run together."""
    values: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    if len(set(values)) > 1:
        first = values[0]
        odd = [r for r, v in enumerate(values) if v != first]
        raise ValueError(f"the ranks disagree on {what}: rank(s) {', '.join(map(str, odd))} differ from rank 0 "
                         f"(start every rank with the same checkpoint, config and options)")


def print0(*args: object, **kwargs: object) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)  # type: ignore[call-overload]


class Watchdog:
    """Heartbeats through torchrun's key-value store: every rank bumps its own counter each `interval`
    seconds and watches everyone else's; a peer whose counter stops for `timeout` seconds (killed, hung,
    its node gone) or a store that stops answering calls `on_failure(message)` once. The default action
    prints the message and exits the process (status 1): a rank blocked in a collective with a dead peer
    would otherwise wait for the collective timeout, or forever on some backends."""

    def __init__(self, interval: float = 1.0, timeout: float = 15.0,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.interval, self.timeout = interval, timeout
        self.on_failure = on_failure or _exit_with
        self.stopped = threading.Event()
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._run, name="grok1-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.thread.start()
        atexit.register(self.stop)  # never left inside a store call while the interpreter exits
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        beats, seen = 0, {r: (-1, time.monotonic()) for r in range(self.world_size) if r != self.rank}
        keys = [f"grok1/heartbeat/{r}" for r in range(self.world_size)]
        while not self.stopped.is_set():
            try:
                beats += 1
                self.store.set(keys[self.rank], str(beats))
                now = time.monotonic()
                for r, (last, since) in seen.items():
                    value = int(self.store.get(keys[r])) if self.store.check([keys[r]]) else -1
                    if value != last:
                        seen[r] = (value, now)
                    elif now - since > self.timeout:
                        return self._fail(f"rank {r} stopped responding (no heartbeat for {now - since:.0f} s): "
                                          f"it died or hung; see its log")
            except Exception as e:  # noqa: BLE001  the store went away with its host (rank 0's node)
                if not self.stopped.is_set():
                    return self._fail(f"lost contact with the job's rendezvous store ({e}); rank 0 or its node "
                                      f"is gone")
            self.stopped.wait(self.interval)

    def _fail(self, message: str) -> None:
        self.failure = f"rank {self.rank}: {message}"
        self.on_failure(self.failure)


def _exit_with(message: str) -> None:
    print(f"grok1: error: {message}; exiting", file=sys.stderr, flush=True)
    os._exit(1)
