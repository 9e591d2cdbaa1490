"""Child processes whose output is watched line by line, so callers wait on what a process says
(a start-up line, a phase change) instead of sleeping."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from typing import Any


class LogWatcher:
    """Collects a process's output lines in a thread; tests wait on a pattern, never on time."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_sync(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r}; output was:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(remaining)

    async def wait(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        return await asyncio.to_thread(self.wait_sync, pattern, timeout, start)

    def join(self) -> None:
        self._thread.join(10)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


def spawn_watched(command: list[str], **popen: Any) -> tuple[subprocess.Popen[bytes], LogWatcher]:
    """Start ``command`` with its output (stdout and stderr together) read by a LogWatcher."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    return process, LogWatcher(process.stdout)
