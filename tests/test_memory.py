"""The bot gives big blocks back to the kernel once freed (bot/memory.py).

Found by bench/bench_offsite.py: the bot's RSS kept 20-70 MB after each big
snapshot and peaked over 150 MB while saving and uploading 548 MB, because
glibc's raised mmap threshold left the pipeline's freed batches in per-thread
heaps. Only `run` sets it up; one-shot CLI commands keep glibc's default, whose
heap reuse costs less system CPU. The child below frees an 8 MiB block (which raises glibc's threshold),
then four threads allocate and free 12 MiB each in 1 MiB blocks, as the
pipeline's stages do; it prints how much anonymous memory stayed.
"""
from __future__ import annotations

import os
import subprocess
import sys

from bot.memory import keep_big_blocks_mapped

CHILD = """
import sys, threading
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
from bot.cli import main
if sys.argv[1] == "run":  # the bot: set up first, then it stops at the missing configuration
    assert main(["run", "--config", "/nonexistent.toml"]) == 2
if sys.argv[1] == "one-shot":  # a CLI command, whose memory ends with it
    assert main(["snapshot", "status", "/nonexistent.db"]) == 2
big = bytes(8 << 20)
del big
before = anon()
barrier = threading.Barrier(4)
def worker():
    blocks = [bytearray(1 << 20) for _ in range(12)]
    barrier.wait()
    del blocks
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(round(anon() - before, 1))
"""

def retained_mb(mode: str, **env: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def test_the_bot_gives_freed_batches_back_and_without_it_they_stay():
    assert retained_mb("plain") > 30  # the control: glibc alone keeps most of the 48 MiB
    assert retained_mb("run") < 4


def test_one_shot_commands_keep_glibcs_cheaper_default():
    assert retained_mb("one-shot") > 30


def test_an_operators_malloc_setting_wins():
    assert retained_mb("run", MALLOC_MMAP_THRESHOLD_=str(64 << 20)) > 30
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ and keep_big_blocks_mapped() is True
