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


def test_allocate_for_picks_the_row_holding_the_longest_prefix():
    a = SlotAllocator(4)
    for rid in "abcd":
        a.allocate(rid)
    a.release(1, [5, 6, 7, 8])
    a.release(2, [5, 6, 9])
    a.release(3)  # contents unknown: never reused
    assert a.allocate_for("x", [5, 6, 7, 1, 2]) == (1, 3)  # row 1 holds 5 6 7
    assert a.allocate_for("y", [5, 6, 9]) == (2, 2)  # the whole prompt is held, but its last token must run
    assert a.allocate_for("z", [5, 6, 9]) == (3, 0)  # no row with contents left: the lowest free one
    assert a.allocate_for("w", [1]) is None  # all taken
    a.release(1, [4, 4])
    a.forget()
    assert a.allocate_for("v", [4, 4, 4]) == (1, 0)  # after a failed step nothing is trusted


def test_a_plain_allocation_drops_the_rows_contents():
    a = SlotAllocator(2)
    a.allocate("a")
    a.release(0, [1, 2, 3])
    assert a.allocate("b") == 0  # lowest row first, its contents to be overwritten
    a.allocate("c")
    a.release(0)
    assert a.allocate_for("d", [1, 2, 3, 4]) == (0, 0)


def test_clear_slot_from_a_position_keeps_the_prefix():
    cache = KVCache(1, 2, 4, 1, 2, torch.float32)
    cache.valid[:] = True
    clear_slot(cache, 1, 2)
    assert cache.valid.tolist() == [[True] * 4, [True, True, False, False]]
