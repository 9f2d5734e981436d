"""Heavy jobs keep freed memory mapped (glibc), unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest

PROBE = """
import numpy as np, psutil
from fewseg.allocator import keep_freed_memory
print(keep_freed_memory())
rss = lambda: psutil.Process().memory_info().rss
before = rss()
block = np.ones(200 * 2**20, dtype=np.uint8)  # one 200 MB block, every page touched
del block
print(int((rss() - before) / 2**20))
"""


def _probe(**env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FEWSEG_ALLOCATOR"}
    r = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    message, retained = r.stdout.strip().splitlines()
    return message, int(retained)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc behaviour")
def test_freed_blocks_stay_mapped_by_default():
    message, retained = _probe()
    assert "kept mapped" in message
    assert retained >= 150, f"only {retained} MB of a freed 200 MB block stayed mapped"


def test_user_choice_wins():
    message, retained = _probe(FEWSEG_ALLOCATOR="system")
    assert "system defaults" in message and retained < 50
    message, _ = _probe(MALLOC_TRIM_THRESHOLD_="1000000")
    assert "left to the environment (MALLOC_TRIM_THRESHOLD_ set)" in message
