"""The glibc setting that keeps memory freed while loading from piling up in the heap.

Each measurement runs in a fresh interpreter: how glibc serves a 2 MiB block depends on the process's
history (its mmap threshold moves as mapped blocks are freed), so a long test session could decide
the outcome instead of the setting under test."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

CHURN = """
import json, torch
from edgetune.train.heap import lean_heap, released_promptly, rss

def churn(n=64, size=512 * 1024, live=64 * 1024):
    # blocks like weights being converted (2 MiB), each followed by one that stays live (256 KiB,
    # too large for the allocator's lists of small free blocks)
    freed, kept = [], []
    for _ in range(n):
        freed.append(torch.ones(size))
        kept.append(torch.ones(live))
    return freed, kept

def returned(n=64, size=512 * 1024, live=64 * 1024, release=None):
    freed, kept = churn(n, size, live)
    before = rss()
    del freed
    if release is not None:
        before = rss()
        release()
    return before - rss()
"""


def measured(body: str) -> dict:
    """Run CHURN + `body` (which prints a JSON object) in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", CHURN + body], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_blocks_freed_while_loading_go_back_to_the_os():
    """The second round counts: glibc's own threshold rises once a mapped block is freed, after which
    (measured without the setting) a second round of 2 MiB blocks stays in the heap, 0 MiB returned."""
    got = measured("""
with released_promptly():
    returned()
    print(json.dumps({'mib': returned() / 2**20}))
""")
    assert got["mib"] > 100, got


def test_lean_heap_returns_activation_sized_blocks_and_restores_the_default():
    """With checkpointing, blocks of 1 MiB and more are unmapped when freed; afterwards they are not."""
    got = measured("""
with lean_heap():
    returned()
    lean = returned()  # the second round, as above
after = returned()  # 2 MiB blocks stay in the heap at the 32 MiB default
with lean_heap(enabled=False):
    disabled = returned()
print(json.dumps({'lean': lean / 2**20, 'after': after / 2**20, 'disabled': disabled / 2**20}))
""")
    assert got["lean"] > 100 and got["after"] < 16 and got["disabled"] < 16, got


def test_lean_heap_release_hands_back_the_free_pages_of_small_blocks():
    """Blocks under the lean threshold stay in the heap when freed; the after-step release returns
    their pages."""
    got = measured("""
with lean_heap() as release:
    # 512 KiB blocks: in the heap, under the 1 MiB threshold; live blocks between them keep the heap
    # from shrinking
    mib = returned(256, 128 * 1024, 16 * 1024, release) / 2**20
print(json.dumps({'mib': mib}))
""")
    assert got["mib"] > 64, got
