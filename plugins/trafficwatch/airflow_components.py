"""Airflow's four components for local runs, under one small parent: `python -m trafficwatch.airflow_components`.

The `airflow` service (services.airflow) runs this module instead of `airflow standalone`. It starts the
api-server, scheduler, dag-processor and triggerer as its children, in its own process group (the service's:
`make down` stops them all by it), and writes their output to its own, each line prefixed with the
component's name, as standalone did. It imports nothing beyond the standard library: it costs a few MiB, where
standalone's parent (which imported Airflow to do the same) took about 144 MiB of PSS.

What standalone also did is done elsewhere: the database migration (the Makefile's `_airflow` target), the
admin user and its password (`AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS` and the passwords file that
scripts/env.sh writes from secrets.env); the simple auth manager is Airflow's default, the executor Airflow's
LocalExecutor with the scheduler left frozen for the garbage collector (`trafficwatch.executor`, set in scripts/env.sh);
the triggerer is frozen when its job starts by the package's Airflow plugin (`trafficwatch.airflow_plugin`).

The scheduler and the triggerer run without their log servers (`--skip-serve-logs`, each a process of 50-100
MiB, bound to every interface on fixed ports 8793 and 8794): every component runs on this machine and writes
task and trigger logs under one log folder, which the api-server reads directly (Airflow's FileTaskHandler
reads the local files first, trigger logs included).

If a component exits, the others are stopped and this process exits with code 1: `trafficwatch service
status airflow` then says Airflow is not running, rather than one part of it missing unnoticed.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from types import FrameType

# Component name -> `airflow` arguments.
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
# After a SIGTERM, how long the components have before they are killed (services.stop kills the whole group
# itself after 20 s).
STOP_TIMEOUT_S = 15.0


def _say(name: str, line: str) -> None:
    sys.stdout.write(f"{name:13} | {line}\n")
    sys.stdout.flush()


class _Output:
    """The components' output pipes, copied line by line to this process's output with their names."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.pending: dict[int, bytes] = {}

    def add(self, name: str, fd: int) -> None:
        os.set_blocking(fd, False)
        self.selector.register(fd, selectors.EVENT_READ, name)
        self.pending[fd] = b""

    def pump(self, timeout_s: float) -> None:
        """Copy what the components wrote, waiting up to `timeout_s` for something to read."""
        if not self.pending:
            time.sleep(timeout_s)
            return
        for key, _ in self.selector.select(timeout=timeout_s):
            fd, name = int(key.fd), str(key.data)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # the component closed its output (it exited)
                self.selector.unregister(fd)
                if rest := self.pending.pop(fd):
                    _say(name, rest.decode(errors="replace").rstrip())
                continue
            *lines, self.pending[fd] = (self.pending[fd] + chunk).split(b"\n")
            for line in lines:
                _say(name, line.decode(errors="replace").rstrip())


def _stop(children: dict[str, subprocess.Popen[bytes]], output: _Output) -> None:
    """SIGTERM every component still running and copy their output until they exit; SIGKILL those that
    outlive STOP_TIMEOUT_S."""
    for process in children.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(process.poll() is None for process in children.values()) and time.monotonic() < deadline:
        output.pump(0.2)
    for name, process in children.items():
        if process.poll() is None:
            _say("components", f"{name} did not stop within {STOP_TIMEOUT_S:.0f} s: killed")
            process.kill()
            process.wait()
    output.pump(0)


def run(airflow: str) -> int:
    """Run the components with the `airflow` program at `airflow` until one exits or this process is told to
    stop (SIGTERM, SIGINT); the exit code is that of the first component to exit, 0 when told to stop."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: dict[str, subprocess.Popen[bytes]] = {}
    output = _Output()
    for name, args in COMPONENTS.items():
        process = subprocess.Popen(
            [airflow, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        children[name] = process
        assert process.stdout is not None
        output.add(name, process.stdout.fileno())
        _say("components", f"{name} started, pid {process.pid}: airflow {' '.join(args)}")
    exit_code = 0
    while not stopping:
        output.pump(1.0)
        exited = {name: process.returncode for name, process in children.items() if process.poll() is not None}
        if exited:
            for name, code in exited.items():
                _say("components", f"{name} exited with code {code}: stopping the others")
            exit_code = 1
            break
    _say("components", "stopping every component")
    _stop(children, output)
    _say("components", "stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
