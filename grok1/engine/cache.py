"""Slot allocator over the rows of one static KV cache.

The engine keeps a single `KVCache` of shape [L, max_batch, K, max_seq_len, Hd]; each running
request owns one batch row ("slot") from admission until it finishes or is cancelled. Rows are
handed out lowest-first so a lightly loaded engine touches the same memory.
"""

from __future__ import annotations

import heapq
from typing import cast

from torch import Tensor

from grok1.model import KVCache


class SlotAllocator:
    """Which cache row belongs to which request. Plain data; not thread-safe (the engine thread owns it)."""

    def __init__(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError(f"a KV cache needs at least one slot, got {n_slots}")
        self.n_slots = n_slots
        self.free: list[int] = list(range(n_slots))  # a heap: lowest row first
        self.owner: dict[int, str] = {}  # slot -> request id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, request_id: str) -> int | None:
        """A free slot for `request_id`, or None when every row is taken."""
        if not self.free:
            return None
        slot = heapq.heappop(self.free)
        self.owner[slot] = request_id
        return slot

    def release(self, slot: int) -> None:
        """Give the row back. Releasing a slot that is not allocated is a bug."""
        assert slot in self.owner, (slot, sorted(self.owner))
        del self.owner[slot]
        heapq.heappush(self.free, slot)


def clear_slot(cache: KVCache, slot: int) -> None:
    """Forget the tokens of a finished request (its keys are masked out until overwritten)."""
    valid = cast(Tensor, cache.valid)  # a registered buffer
    valid[slot] = False
