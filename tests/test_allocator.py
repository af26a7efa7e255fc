"""The glibc setting that keeps memory freed while loading from piling up in the heap."""

import sys

import pytest
import torch

from edgetune.train.heap import released_promptly, rss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def _churn() -> tuple[list, list]:
    """2 MiB blocks (like weights being converted), each followed by a 256 KiB block that stays live
    (too large to be served from the allocator's lists of small free blocks)."""
    big, kept = [], []
    for _ in range(64):
        big.append(torch.ones(512 * 1024))
        kept.append(torch.ones(64 * 1024))
    return big, kept


def test_blocks_freed_while_loading_go_back_to_the_os():
    with released_promptly():
        big, kept = _churn()
        before = rss()
        del big
        returned = before - rss()
    assert returned > 100 * 2**20


def test_lean_heap_returns_activation_sized_blocks_and_restores_the_default():
    """With checkpointing, blocks of 1 MiB and more are unmapped when freed; afterwards they are not."""
    from edgetune.train.heap import lean_heap

    def returned_after_churn() -> int:
        big, kept = _churn()
        before = rss()
        del big
        return before - rss()

    with lean_heap():
        assert returned_after_churn() > 100 * 2**20
    assert returned_after_churn() < 16 * 2**20  # 2 MiB blocks stay in the heap at the 32 MiB default
    with lean_heap(enabled=False):
        assert returned_after_churn() < 16 * 2**20


def test_lean_heap_release_hands_back_the_free_pages_of_small_blocks():
    """Blocks under the lean threshold stay in the heap when freed; the after-step release returns
    their pages."""
    from edgetune.train.heap import lean_heap

    def churn_small() -> tuple[list, list]:
        freed, kept = [], []
        for _ in range(256):
            freed.append(torch.ones(128 * 1024))  # 512 KiB: in the heap, under the 1 MiB threshold
            kept.append(torch.ones(16 * 1024))  # live blocks between them keep the heap from shrinking
        return freed, kept

    with lean_heap() as release:
        freed, kept = churn_small()
        del freed
        before = rss()
        release()
        assert before - rss() > 64 * 2**20, f"{(before - rss()) / 2**20:.0f} MiB"
