"""Keep freed message buffers in the process, so that receiving a model-size message does not fault in fresh pages.

ZeroMQ's I/O thread allocates every incoming message (4.8 MB for the ``cnn``) with ``malloc``, and the receive's
copy out of the kernel is the first write to that memory. glibc's allocator adapts its thresholds as it goes: a
block above the mmap threshold is mapped and unmapped each time (1,172 page faults per 4.8 MB message), and a heap
whose free top passes the trim threshold is shrunk, to be faulted in again by the next message. Which of these a
process ends up in depends on the order of its first frees: a loaded broker took 4 to 36 minor faults per update
from one run to the next (in ZeroMQ's I/O thread, ``recv`` copying into new pages), the raw echo none, and each
fault on a virtual machine is a trap, a page of zeroing and, for an unmap, other cores' TLBs flushed.

``keep_message_memory`` fixes both thresholds once, before the first message: blocks up to 32 MiB (glibc's
largest mmap threshold) come from the heap, and up to 256 MiB of free memory stays with it. The process keeps its
peak of message memory instead of handing it back between messages. A no-op where the C library is not glibc, and
with ``ZSGD_KEEP_MEMORY=0`` (to compare).
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2); a larger value is refused
TRIM_THRESHOLD = 256 << 20

_done: bool | None = None


def keep_message_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once; later calls return the first answer).
    True when both were set; False on another C library, when refused, or with ``ZSGD_KEEP_MEMORY=0``."""
    global _done
    if _done is None:
        _done = False
        if os.environ.get("ZSGD_KEEP_MEMORY", "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # The mmap threshold first: setting either turns off glibc's adaptation of both.
            _done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _done
