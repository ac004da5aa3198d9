"""Running a subcommand as one rank of a torchrun job (`--tp T --ep E`): join the job, check every rank
loaded the same thing, watch the other ranks, print on rank 0 only."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from grok1.config import ModelConfig
from grok1.parallel.dist import Mesh, Watchdog, check_same, fingerprint, init_mesh, under_torchrun
from grok1.weights.load import checkpoint_identity


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (run under torchrun: --nproc-per-node x --nnodes = --tp x --ep)")
    g.add_argument("--tp", type=int, default=1, metavar="T",
                   help="tensor-parallel ranks: attention heads, expert widths and the vocabulary split T ways "
                        "(default 1)")
    g.add_argument("--ep", type=int, default=1, metavar="E",
                   help="expert-parallel ranks: each holds n_experts / E experts (default 1); with --tp, TP runs "
                        "within groups of T consecutive ranks (one node) and EP across them")
    g.add_argument("--dist-timeout", type=float, default=600.0, metavar="S",
                   help="a collective that waits longer than S seconds fails instead of hanging (default 600: "
                        "ranks may load at different speeds)")
    g.add_argument("--heartbeat-timeout", type=float, default=15.0, metavar="S",
                   help="a rank silent for S seconds (killed, hung, its node gone) stops the others with an "
                        "error naming it (default 15)")


@dataclass
class Job:
    """This process's place in a torchrun job."""
    mesh: Mesh
    watchdog: Watchdog
    control: dist.ProcessGroup  # a CPU (gloo) group for control messages

    @property
    def rank(self) -> int:
        return self.mesh.rank

    def leave(self) -> None:
        """Wait for every rank to finish, then stop watching them."""
        dist.barrier(group=self.control)
        self.watchdog.stop()
        dist.destroy_process_group()


def join(args: argparse.Namespace, cfg: ModelConfig) -> Job | None:
    """This process's place in the job (None when it runs alone), after checking that every rank has the same
    config, checkpoint and options; starts the heartbeat watchdog."""
    if args.tp * args.ep == 1 and (not under_torchrun() or os.environ.get("WORLD_SIZE") == "1"):
        return None
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    mesh = init_mesh(args.tp, args.ep, "nccl" if cuda else "gloo", args.dist_timeout)
    # Control traffic (the check below, the steps rank 0 sends) goes over a CPU group whatever the backend, with
    # no practical timeout: a server's followers wait for the next request as long as it takes (the watchdog,
    # not a timeout, tells them when rank 0 is gone).
    control = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    watchdog = Watchdog(timeout=args.heartbeat_timeout).start()
    check_same("the model (config, checkpoint index, options)",
               fingerprint(cfg.to_dict(), checkpoint_identity(Path(args.checkpoint)), args.tp, args.ep,
                           args.dtype, getattr(args, "no_pack", False), getattr(args, "table", None)), control)
    return Job(mesh, watchdog, control)


@contextlib.contextmanager
def rank0_output(job: Job | None) -> Iterator[None]:
    """Standard output of ranks other than 0 goes nowhere (every rank computes the same text)."""
    if job is None or job.rank == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def common_seed(job: Job | None, seed: int | None) -> int | None:
    """Sampling without a seed must still draw the same tokens on every rank: rank 0 picks one for all."""
    if job is None or seed is not None:
        return seed
    box = [random.randrange(2**62)]
    dist.broadcast_object_list(box, src=0, group=job.control)
    return box[0]


def exit_on_failure(e: BaseException, wait_s: float) -> None:
    """A rank's step failed (typically a collective whose peer died): give the watchdog `wait_s` seconds to
    name the rank that is gone (it exits the process with that message), else exit with this error."""
    time.sleep(wait_s)
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"grok1: error: rank {rank}: {first}; another rank may have died or hung, see its log",
          file=sys.stderr, flush=True)
    os._exit(1)
