"""Slot allocator over the rows of one static KV cache.

The engine keeps a single `KVCache` of shape [L, max_batch, K, max_seq_len, Hd]; each running
request owns one batch row ("slot") from admission until it finishes or is cancelled. Rows are
handed out lowest-first so a lightly loaded engine touches the same memory.

Prefix reuse: a released row still holds the keys and values of the tokens its request ran
(`contents`), until it is handed out again. `allocate_for` gives a new prompt the free row whose
contents share the longest prefix with it; those positions need not be computed again.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
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
        self.contents: dict[int, list[int]] = {}  # free slot -> the tokens whose keys and values it holds

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, request_id: str) -> int | None:
        """A free slot for `request_id`, or None when every row is taken."""
        if not self.free:
            return None
        slot = heapq.heappop(self.free)
        self.owner[slot] = request_id
        self.contents.pop(slot, None)  # to be overwritten
        return slot

    def allocate_for(self, request_id: str, prompt: Sequence[int]) -> tuple[int, int] | None:
        """(slot, reused) for a prompt: the free row holding the longest prefix of it (else the lowest free
        row), and how many of its first tokens that row already holds (at most all but the last, whose
        logits are needed). None when every row is taken."""
        best, reused = None, 0
        for slot in sorted(self.contents):
            n = common_prefix(self.contents[slot], prompt, len(prompt) - 1)
            if n > reused:
                best, reused = slot, n
        if best is None:
            slot = self.allocate(request_id)
            return None if slot is None else (slot, 0)
        self.free.remove(best)
        heapq.heapify(self.free)
        del self.contents[best]
        self.owner[best] = request_id
        return best, reused

    def release(self, slot: int, contents: list[int] | None = None) -> None:
        """Give the row back, with the tokens whose keys and values it holds (None: unknown, not reused).
        Releasing a slot that is not allocated is a bug."""
        assert slot in self.owner, (slot, sorted(self.owner))
        del self.owner[slot]
        heapq.heappush(self.free, slot)
        if contents:
            self.contents[slot] = contents

    def forget(self) -> None:
        """No free row's contents are known any more (e.g. after a failed step)."""
        self.contents.clear()


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n


def clear_slot(cache: KVCache, slot: int, start: int = 0) -> None:
    """Forget a row's tokens from position `start` on (their keys are masked out until overwritten)."""
    valid = cast(Tensor, cache.valid)  # a registered buffer
    valid[slot, start:] = False
