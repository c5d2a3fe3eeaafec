"""Aligned read buffers: page (or 2 MiB) aligned, writable, and on a huge page when asked and offered."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine.buffers import HUGE_PAGE, PAGE, AlignedBuffer, SlotPool, huge_pages_available

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("huge", [False, True])
def test_buffers_are_aligned_and_writable(huge: bool) -> None:
    with AlignedBuffer(16 * KiB, huge) as buffer:
        assert buffer.array.nbytes == 16 * KiB and buffer.array.flags.writeable
        buffer.array[:] = 7
        assert buffer.array.ctypes.data == buffer.address
    assert buffer.address % (HUGE_PAGE if buffer.huge else PAGE) == 0
    assert buffer.huge == (huge and huge_pages_available())


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        AlignedBuffer(0)


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages")
@pytest.mark.parametrize("size", [16 * KiB, 256 * KiB, 2 * MiB])
def test_huge_buffers_are_on_a_huge_page(size: int) -> None:
    with AlignedBuffer(size, huge=True) as buffer:
        buffer.array[0] = 1  # fault it in
        assert _anon_huge_kib(buffer.address) >= 2048


@pytest.mark.parametrize("huge", [False, True])
def test_slot_pool_hands_out_disjoint_aligned_slots_and_reuses_them(huge: bool) -> None:
    pool = SlotPool(10_000, huge, slots_per_slab=3)
    try:
        assert pool.slot_bytes == 12_288  # whole pages
        slots = [pool.take() for _ in range(5)]  # two slabs
        assert pool.allocated_bytes == 6 * pool.slot_bytes
        starts = sorted(slot.address for slot in slots)
        assert all(b - a >= pool.slot_bytes for a, b in itertools.pairwise(starts))
        for i, slot in enumerate(slots):
            assert slot.address % PAGE == 0 and slot.array.nbytes == pool.slot_bytes
            slot.array[:] = i
        assert [int(slot.array[0]) for slot in slots] == list(range(5))  # no two share memory
        pool.give(slots[2])
        assert pool.take().address == slots[2].address
        assert pool.allocated_bytes == 6 * pool.slot_bytes
    finally:
        del slots
        pool.close()
