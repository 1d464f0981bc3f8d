"""Airflow's four components for local runs, forked from one parent: `python -m trafficwatch.airflow_components`.

The `airflow` service (services.airflow) runs this module instead of `airflow standalone`. It starts the
api-server, scheduler, dag-processor and triggerer as its children, in its own process group (the service's:
`make down` stops them all by it), and writes their output to its own, each line prefixed with the
component's name, as standalone did.

The components are forked from this process, each then running the `airflow` command's `main()` with its
arguments (its process title set to `airflow <arguments>`), once this process has imported what they all
import at their start (`PRELOAD`: Airflow's models, the scheduler's, triggerer's and dag-processor's job code,
the api-server's application, ~2,000 modules and ~150 MiB) and frozen those objects for the garbage collector.
The four then share those pages instead of each importing its own copy. Measured in a demo stack without
history (2026-12-02, 60 one-second samples from 90 s after Airflow's start), Airflow's processes took 708 MiB
of PSS in all, against 874 when each component was a program of its own: api-server 204 against 261,
dag-processor 93 against 156, the triggerer's two processes 146 against 203, the scheduler and its three idle
task slots 203 against 248, this parent 62 against 6. Nothing in `PRELOAD` starts a thread when imported (a
fork copies only the thread that calls it: this process refuses to fork otherwise, and
tests/unit/test_airflow_components.py checks the list); the database engine Airflow makes at import is reset
in every forked child by Airflow's own at-fork hook, before the child ever connects.

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

import contextlib
import gc
import importlib
import os
import selectors
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

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
# The `airflow` command's module, and what the four components import at their start, imported once by this
# process before it forks them, so that they share those pages.
AIRFLOW_MAIN = "airflow.__main__"
PRELOAD = (
    "airflow.jobs.scheduler_job_runner",
    "airflow.jobs.triggerer_job_runner",
    "airflow.dag_processing.manager",
    "airflow.api_fastapi.app",
)


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


class _Component:
    """A component forked from this process: what `run` and `_stop` need of it (the part of subprocess.Popen
    they used when each component was a program of its own)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def _component_main(main: str, args: list[str], output_fd: int, inherited: list[int]) -> NoReturn:
    """In the forked child: become `airflow <args>` (its output to `output_fd`), and never return."""
    code = 1
    try:
        for fd in inherited:  # the other components' pipes and this parent's selector
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.argv = ["airflow", *args]
        with contextlib.suppress(ImportError):  # `ps` then names the component, not this module
            importlib.import_module("setproctitle").setproctitle(" ".join(sys.argv))
        importlib.import_module(main).main()
        code = 0
    except SystemExit as stop:  # sys.exit(n), or sys.exit("message") as the `airflow` command does
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork(main: str, args: list[str], output: _Output) -> tuple[_Component, int]:
    """Fork a component; returns it and the read end of its output pipe."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()  # or the child would write this process's buffered lines again
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _component_main(main, args, write_fd, [read_fd, *output.pending, output.selector.fileno()])
    os.close(write_fd)
    return _Component(pid), read_fd


def _stop(children: dict[str, _Component], output: _Output) -> None:
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


def run(main: str, preload: Sequence[str] = ()) -> int:
    """Run the components, each forked from this process and running `main`'s main() (`airflow.__main__`:
    the `airflow` command) with its arguments, once the modules `preload` are imported here, until one exits or
    this process is told to stop (SIGTERM, SIGINT); the exit code is that of the first component to exit, 0
    when told to stop."""
    started = time.monotonic()
    for module in (*preload, main):
        importlib.import_module(module)
    if threading.active_count() > 1:  # a fork copies only the thread that called it: the others' locks stay held
        names = ", ".join(thread.name for thread in threading.enumerate() if thread is not threading.current_thread())
        raise RuntimeError(f"importing {', '.join(preload) or main} started threads ({names}): cannot fork")
    if preload:
        _say("components", f"{len(sys.modules)} modules imported in {time.monotonic() - started:.1f} s, shared")
    gc.freeze()  # the components' collections then leave the pages of these objects shared
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: dict[str, _Component] = {}
    output = _Output()
    for name, args in COMPONENTS.items():
        process, read_fd = _fork(main, args, output)
        children[name] = process
        output.add(name, read_fd)
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
    sys.exit(run(sys.argv[1], sys.argv[2:]))
