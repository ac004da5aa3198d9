"""The ranks of a tensor/expert-parallel job step together: rank 0 owns the requests, the tokenizer and the
scheduler; its runner broadcasts each step's StepInput (plain data) before running it, and every other rank
runs the same StepInput through its shard of the model (`follow`). The forward's collectives then pair up,
rank 0 samples the tokens that count (the followers' own samples are discarded), and the next step's input
carries them to everyone.
"""

from __future__ import annotations

import torch.distributed as dist

from grok1.engine.runner import ModelRunner, StepInput
from grok1.engine.scheduler import TokenLogprob


class LeaderRunner:
    """Rank 0's runner: a ModelRunner that first sends each step to the followers over `group` (a CPU group)."""

    def __init__(self, runner: ModelRunner, group: dist.ProcessGroup | None) -> None:
        self.runner, self.group = runner, group

    def fits_one_pass(self, rows: int) -> bool:
        return self.runner.fits_one_pass(rows)

    def run(self, step: StepInput) -> tuple[list[int], list[TokenLogprob | None], dict[str, list[TokenLogprob]]]:
        _broadcast(step, self.group)
        return self.runner.run(step)

    def close(self) -> None:
        """Tell the followers there are no more steps (they return from `follow`)."""
        _broadcast(None, self.group)


def follow(runner: ModelRunner, group: dist.ProcessGroup | None) -> int:
    """A follower rank: run every step rank 0 sends until it sends None; returns the number of steps."""
    steps = 0
    while (step := _broadcast(None, group)) is not None:
        runner.run(step)
        steps += 1
    return steps


def _broadcast(obj: StepInput | None, group: dist.ProcessGroup | None) -> StepInput | None:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
