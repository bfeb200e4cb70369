"""Giving memory back: the pages of model files that a compiled model no longer reads.

OpenVINO maps a model's weight file into memory (read_model with mmap) and the CPU plugin
copies every weight into its own blocked layout when it compiles. The mapped pages it read stay
in the process's resident set although nothing reads them again: for an SD 1.5 UNet (fp32,
this project's 2-core Zen 4) 3.3 GB of the 6.6 GB resident after compiling were the mapped
file, and a UNet call afterwards read none of it back. Telling the kernel so (madvise
MADV_PAGEOUT on the read-only mappings of those files, Linux 5.4+) reclaims them at once
instead of whenever memory runs short. PAGEOUT never discards data: a page touched later is
read from the file again, and should the range have been unmapped and reused meanwhile, its
pages are only paged out, not cleared (MADV_DONTNEED would zero them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MADV_PAGEOUT = 21


@functools.cache
def _libc():
    """glibc through ctypes on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def _madvise():
    libc = _libc()
    if libc is None:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def release_file_pages(files: list[Path], maps: Path = Path("/proc/self/maps")) -> int:
    """Reclaim this process's resident pages of the read-only mappings of `files`; returns the
    bytes of mappings released (0 where the platform has no /proc, madvise or MADV_PAGEOUT).
    Writable mappings are left alone."""
    madvise = _madvise()
    if madvise is None or not files:
        return 0
    wanted = {str(f.resolve()) for f in files}
    released = 0
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] not in wanted or "w" in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            released += end - start
    return released


@contextmanager
def releasing_file_pages(files: list[Path], every_s: float = 0.2) -> Iterator[None]:
    """Release the pages of `files` every `every_s` seconds while the block runs (OpenVINO
    compiling a model it reads from them), and once more at its end: the resident set then
    holds at most what was read since the last release, not the whole file beside its copy.
    The kernel does the same under memory pressure; this only does it before the pressure."""
    if _madvise() is None:
        yield
        return
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            release_file_pages(files)

    thread = threading.Thread(target=loop, name="sdonnx-release-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        release_file_pages(files)


@functools.cache
def _malloc_trim():
    trim = getattr(_libc(), "malloc_trim", None)  # None off glibc
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc's malloc_trim): the buffers a part
    freed after its call otherwise stay in the process, counted in its resident set."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
