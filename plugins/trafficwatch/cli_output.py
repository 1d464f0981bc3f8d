"""Where the output of a `trafficwatch` command goes: its log records (the log file, the terminal), its
result lines, and whatever else writes to stderr.

A one-shot command's log lines are held and shown only once it succeeds: a failure is one line on the
terminal, its traceback in the log file. A service's stderr is its own log, written live.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from trafficwatch import errors
from trafficwatch.config import home_from_env

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_held: _HeldLog | None = None
_stderr: TextIO = sys.stderr  # the terminal's stderr, kept for the command's own lines (see other_output_to)


def start() -> None:
    """A new command (tests run several in one process): its own lines go to the stderr of this moment."""
    global _stderr
    _stderr = sys.stderr


def log_file_path() -> Path:
    """The log of every command (of services: their warnings and errors), with every failure's traceback."""
    return home_from_env() / "logs" / "trafficwatch.log"


class _WithoutTraceback(logging.Formatter):
    """A record's traceback goes to the log file, not to the terminal or a service log."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _HeldLog(logging.Handler):
    """The log lines of a one-shot command, shown on stderr once it succeeds (before its result) and
    dropped if it fails: a failure is one line on the terminal, the lines before it are in the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def show(self) -> None:
        for line in self.lines:
            print(line, file=_stderr)
        self.lines.clear()


def configure_logging(command: str, verbose: bool, service: bool) -> list[logging.Handler]:
    """Log records go to the log file, and to stderr: once a one-shot command succeeded, or live with -v or
    for a service (its stderr is its own log). Tracebacks go to the log file only, unless -v."""
    global _held
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    _held = None
    terminal: logging.Handler
    if service or verbose:
        terminal = logging.StreamHandler(sys.stderr)
    else:
        terminal = _held = _HeldLog()
    if verbose:
        terminal.setFormatter(logging.Formatter(LOG_FORMAT))
    else:
        terminal.setFormatter(_WithoutTraceback(LOG_FORMAT))
        terminal.addFilter(lambda record: record.name != errors.log.name)  # main prints that line itself
    handlers = [terminal]
    path = log_file_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = logging.handlers.RotatingFileHandler(path, maxBytes=10_000_000, backupCount=3, encoding="utf-8")
    except OSError:  # a read-only home: the terminal line still names the cause
        log_file = None
    if log_file is not None:
        log_file.setLevel(logging.WARNING if service else level)  # services: their log has the rest
        # Many processes append to it: each line says which process and command wrote it.
        log_file.setFormatter(logging.Formatter(LOG_FORMAT.replace(" ", f" [%(process)d {command}] ", 1)))
        handlers.append(log_file)
    for handler in handlers:
        root.addHandler(handler)
    return handlers


class LogWriter(io.TextIOBase):
    """A text stream whose lines become log records: dbt's console output follows the command's log."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)


def say(text: str) -> None:
    """A command's result, on stdout, after the log lines held for the terminal."""
    show_held()
    print(text, flush=True)


def show_held() -> None:
    """The log lines held for the terminal, on stderr."""
    if _held is not None:
        _held.show()


def to_terminal(text: str) -> None:
    """One of the command's own lines (a refusal, a failure) on its stderr: the terminal's, even while the
    rest of stderr goes to the log file (`other_output_to`)."""
    print(text, file=_stderr)


@contextlib.contextmanager
def other_output_to(log_file: Path, until_exit: bool = False) -> Iterator[None]:
    """Send to the log file whatever else writes to stderr: Rust panics and warnings of delta-rs, polars and
    their object store (written straight to file descriptor 2), Python warnings, libraries' prints. The
    terminal's stderr is kept for the command's own lines (`to_terminal`)."""
    global _stderr
    entry = sys.stderr
    entry.flush()
    saved = os.dup(2)
    try:
        on_fd_2 = entry.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a capture (tests): not the terminal's fd
        on_fd_2 = False
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace") if on_fd_2 else entry
    log_stream = open(log_file, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    os.dup2(log_stream.fileno(), 2)
    _stderr, sys.stderr = terminal, log_stream
    try:
        yield
    finally:
        terminal.flush()
        _stderr, sys.stderr = entry, entry
        if not until_exit:
            os.dup2(saved, 2)
            log_stream.close()
        os.close(saved)
        if terminal is not entry:
            terminal.close()
