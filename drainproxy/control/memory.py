"""Giving back the memory that start-up freed: the serve process runs in every pod."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Return freed heap pages to the kernel (glibc ``malloc_trim``; not glibc: nothing).

    The proxy turns glibc's automatic trimming off for streaming (``M_TRIM_THRESHOLD`` 64 MiB,
    see ``context._keep_freed_memory_for_reuse``), so what imports, compiling and config parsing
    freed would stay resident: about 0.9 MiB per pod (bench/rss.py). Called when start-up is
    over and after the first ``/metrics`` scrape (which imports prometheus_client); it takes a
    few milliseconds. (A ``gc.collect()`` first freed nothing more and stalls the loop.)"""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)
