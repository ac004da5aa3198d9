"""The slot allocator: every cache row is handed out once, lowest first, and comes back on release."""

import pytest
import torch

from grok1.engine.cache import SlotAllocator, clear_slot
from grok1.model import KVCache


def test_allocates_each_row_once_then_none():
    slots = SlotAllocator(3)
    got = [slots.allocate(f"r{i}") for i in range(3)]
    assert got == [0, 1, 2] and slots.num_free == 0
    assert slots.allocate("r3") is None
    slots.release(1)
    assert slots.num_free == 1 and slots.allocate("r4") == 1
    assert slots.owner == {0: "r0", 1: "r4", 2: "r2"}


def test_lowest_free_row_first_and_double_release_is_a_bug():
    slots = SlotAllocator(4)
    for i in range(4):
        slots.allocate(str(i))
    slots.release(3)
    slots.release(0)
    assert slots.allocate("a") == 0
    with pytest.raises(AssertionError):
        slots.release(3)
    with pytest.raises(ValueError, match="at least one slot"):
        SlotAllocator(0)


def test_clear_slot_forgets_only_that_row():
    cache = KVCache(1, 2, 4, 1, 2, torch.float32)
    cache.valid.fill_(True)
    clear_slot(cache, 1)
    assert cache.valid[0].all() and not cache.valid[1].any()
