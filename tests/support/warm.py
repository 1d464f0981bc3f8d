"""Processes started ahead of the test that needs them, each stopped at its first S3 request.

A `trafficwatch merge` spends about a second importing polars, deltalake and boto3 before its first S3
request. A test that kills one at request N then waits for that second every time; started while the
previous test still checks its lake, the next process has done its start-up by the time it is wanted. Each
talks to S3 through a proxy of its own (counts and faults stay per process), held shut until `take()`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.s3proxy import S3Proxy

# Clients time out a request after 30 s (boto3's read timeout, delta-rs' default): a process held longer is
# not used but replaced.
MAX_WAIT_S = 20.0


@dataclass
class Held:
    process: subprocess.Popen[bytes]
    proxy: S3Proxy
    started: float


class WarmProcesses:
    """`take()` gives a started process and its proxy, held: arm the proxy, then `proxy.release()`."""

    def __init__(self, upstream_url: str, command: list[str], env: Callable[[str], dict[str, str]]) -> None:
        self._upstream = upstream_url
        self._command = command
        self._env = env  # the environment for a process whose S3 endpoint is the given URL
        self._next: Held | None = None

    def prepare(self) -> None:
        """Start the next process now (its start-up overlaps what the caller does next)."""
        if self._next is None:
            proxy = S3Proxy(self._upstream).start()
            proxy.hold()
            process = subprocess.Popen(self._command, env=self._env(proxy.url), stderr=subprocess.PIPE)
            self._next = Held(process, proxy, time.monotonic())

    def take(self) -> Held:
        if self._next is not None and time.monotonic() - self._next.started > MAX_WAIT_S:
            self._discard(self._next)
            self._next = None
        self.prepare()
        held, self._next = self._next, None
        assert held is not None
        return held

    def close(self) -> None:
        if self._next is not None:
            self._discard(self._next)
            self._next = None

    @staticmethod
    def _discard(held: Held) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(held.process.pid, signal.SIGKILL)
        held.process.communicate(timeout=30)
        held.proxy.close()
