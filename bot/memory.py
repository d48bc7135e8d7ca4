"""Keep the process's memory given back after a big snapshot.

glibc serves a block of 128 KiB or more with its own mapping, returned to the
kernel when freed, but after freeing such a block it raises that threshold to
the block's size (up to 32 MiB). From then on the snapshot pipeline's 1 MiB
batches, gRPC's buffers and the upload's 5 MiB parts come from the heaps of
the threads that allocate them (a dozen during a save with an upload), which
glibc trims only when their free top exceeds twice the raised threshold. The
bot then kept 15-25 MB more after each snapshot and peaked at 132-168 MB while
saving and uploading 560 MB (bench/bench_offsite.py; 118-145 MB since). Fixing
the threshold turns the raise off, so big blocks stay mapped and go back to
the kernel when freed.

Only the long-running bot does this (`run`): each big block then costs a
mapping and its page faults, about 0.4 s more system CPU per 400 MB saved,
which a one-shot CLI command, whose memory ends with it, need not pay.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3            # mallopt's parameter number (glibc's malloc.h)
MMAP_THRESHOLD = 128 * 1024      # glibc's own starting value, now kept: blocks this big are mapped


def keep_big_blocks_mapped() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); whether it was set.

    Nothing is done off glibc, or when MALLOC_MMAP_THRESHOLD_ is set in the
    environment (glibc applied the operator's value at start-up)."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
