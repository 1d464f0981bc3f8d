"""The stack of `make demo` in a home of its own on free loopback ports, driven through the real make
targets: the end-to-end tests and bench/stack_freshness.py bring it up, watch it and take it down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import requests

from tests.support.freshness import FreshnessWatcher, SnapshotFreshness, breakdown, task_runs
from trafficwatch import services
from trafficwatch.config import REPO_ROOT, Settings, environ, load_settings
from trafficwatch.operate import lag, stack_memory


class StackError(RuntimeError):
    """A make target of the stack failed; the message ends with the tail of its output."""


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


# Variables of the calling shell that scripts/env.sh would honour over the stack's own home.
_INHERITED_PREFIXES = ("TRAFFICWATCH_", "AWS_", "AIRFLOW_", "SUPERSET_", "MAKE", "MFLAGS")


@dataclass
class LocalStack:
    """The stack of `make demo` in `home`, on its own ports, driven by the real make targets.

    `env` is the whole environment make runs with: the caller's, minus every setting scripts/env.sh
    would take from it, plus the home, the ports and the demo feed's arguments.
    """

    home: Path
    env: dict[str, str]
    repo: Path = REPO_ROOT
    _environment: dict[str, str] | None = field(default=None, repr=False)
    _settings: Settings | None = field(default=None, repr=False)
    _serving_db: Path | None = field(default=None, repr=False)

    @classmethod
    def on_free_ports(
        cls, home: Path, feed_args: str = "--interval 60", extra_env: dict[str, str] | None = None
    ) -> LocalStack:
        s3_port = services.free_s3_port()
        taken = {s3_port + i for i in range(6)} | {s3_port + 10000 + i for i in range(6)}
        ports = {}
        for name in ("FEED", "AIRFLOW", "SUPERSET"):
            ports[name] = _free_port(taken)
            taken.add(ports[name])
        env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
        env.update(
            TRAFFICWATCH_HOME=str(home),
            TRAFFICWATCH_S3_PORT=str(s3_port),
            TRAFFICWATCH_FEED_PORT=str(ports["FEED"]),
            TRAFFICWATCH_AIRFLOW_PORT=str(ports["AIRFLOW"]),
            TRAFFICWATCH_SUPERSET_PORT=str(ports["SUPERSET"]),
            DEMO_FEED_ARGS=feed_args,
            DEMO_HISTORY_DAYS="0",  # no simulated history unless asked for: the stack's own figures stay comparable
        )
        env.update(extra_env or {})
        home.mkdir(parents=True, exist_ok=True)
        return cls(home=home, env=env)

    def make(self, target: str, timeout_s: float = 900) -> float:
        """Run `make TARGET` in the repository with the stack's environment; its duration in seconds.

        The output goes to `<home>/logs/make-TARGET.log` (appended); StackError quotes its tail on failure.
        """
        log_path = self.home / "logs" / f"make-{target}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(log_path, "ab") as log_file:
            log_file.write(f"\n=== make {target} at {datetime.now(UTC).isoformat()}\n".encode())
            log_file.flush()
            done = subprocess.run(
                ["make", "--no-print-directory", target],
                cwd=self.repo,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
                check=False,
            )
        if done.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise StackError(f"make {target} exited with {done.returncode}:\n" + "\n".join(tail))
        return time.monotonic() - started

    def up(self) -> float:
        """`make demo`: S3, the feed, the worker, Airflow and Superset; seconds it took."""
        return self.make("demo")

    def down(self) -> float:
        """`make down`; seconds it took."""
        return self.make("down", timeout_s=300)

    def environment(self) -> dict[str, str]:
        """The environment the services get: scripts/env.sh sourced over `env` (it creates the secrets once)."""
        if self._environment is None:
            self._environment = self._source_env()
        return self._environment

    def _source_env(self) -> dict[str, str]:
        done = subprocess.run(
            ["bash", "-c", "source scripts/env.sh >/dev/null && env -0"],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        pairs = (item.split(b"=", 1) for item in done.stdout.split(b"\0") if b"=" in item)
        return {name.decode(): value.decode() for name, value in pairs}

    def settings(self) -> Settings:
        """The stack's settings, as its services read them (never from this process's environment)."""
        if self._settings is None:
            from trafficwatch import serving

            with environ(self.environment(), replace=True):
                self._settings = load_settings()
                self._serving_db = serving.serving_db_path(self._settings)
        return self._settings

    @property
    def serving_db(self) -> Path:
        """The stack's serving file (serving_db_path reads TRAFFICWATCH_SERVING_DB from the environment)."""
        self.settings()
        assert self._serving_db is not None
        return self._serving_db

    def s3(self) -> Any:
        """An S3 client on the stack's S3 server, with its generated keys."""
        env = self.environment()
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def storage_options(self) -> dict[str, str]:
        """delta-rs options for the stack's tables, keys included (this process does not have them)."""
        from trafficwatch import lake

        env = self.environment()
        return {
            **lake.storage_options(self.settings()),
            "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        }

    def watcher(self, poll_s: float = 0.5) -> FreshnessWatcher:
        """A freshness watcher on this stack's bucket and serving file, sampling its memory every second: the
        worker's build holds its peak (+120 MiB over its 475 MiB of PSS at rest) for about a second a minute,
        which samples 5 s apart caught only now and then."""
        return FreshnessWatcher(
            self.s3(),
            self.settings().bucket,
            self.serving_db,
            poll_s,
            sample=lambda: stack_memory(self.home),
            sample_every_s=1.0,
        )

    def lag(self) -> dict[str, Any]:
        return lag(self.settings(), self.s3(), self.storage_options(), self.serving_db)

    def merged_at(self) -> dict[str, datetime]:
        """Raw key -> when the merge log recorded it."""
        import polars as pl
        from deltalake import DeltaTable

        from trafficwatch import lake

        options = self.storage_options()
        table = DeltaTable(lake.table_uri(self.settings(), lake.MERGE_LOG), storage_options=options)
        frame = lake.scan_table(table, options).select("source_key", "merged_at").collect()
        return {
            key: moment.astimezone(UTC) for key, moment in frame.group_by("source_key").agg(pl.min("merged_at")).rows()
        }

    def breakdown(self, snapshots: list[SnapshotFreshness], wait_s: float = 30) -> list[dict[str, Any]]:
        """`breakdown` for this stack's snapshots; a report, so a failure is a row saying why, not an error.

        The marts task that published the newest snapshot ends a moment after the file is visible: this
        waits up to `wait_s` for every snapshot's task runs to be recorded.
        """
        deadline = time.monotonic() + wait_s
        try:
            while True:
                rows = breakdown(snapshots, self.merged_at(), task_runs(self.airflow_db))
                if len(rows) >= len(snapshots) or time.monotonic() > deadline:
                    return rows
                time.sleep(1)
        except Exception as error:
            return [{"error": f"{type(error).__name__}: {error}"}]

    @property
    def feed_url(self) -> str:
        return f"http://127.0.0.1:{self.env['TRAFFICWATCH_FEED_PORT']}"

    @property
    def superset_url(self) -> str:
        return f"http://127.0.0.1:{self.env['TRAFFICWATCH_SUPERSET_PORT']}"

    @property
    def airflow_db(self) -> Path:
        return self.home / "airflow" / "airflow.db"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.env['TRAFFICWATCH_AIRFLOW_PORT']}"

    def airflow_api(self) -> requests.Session:
        """A session on the stack's Airflow REST API as its admin (the password scripts/env.sh generated)."""
        password = self.environment()["TRAFFICWATCH_AIRFLOW_ADMIN_PASSWORD"]
        token = requests.post(
            f"{self.airflow_url}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        if token.status_code != 201:
            raise StackError(f"Airflow refused the admin's token: {token.status_code} {token.text[:300]}")
        session = requests.Session()
        session.headers.update(Authorization=f"Bearer {token.json()['access_token']}", Accept="application/json")
        return session

    def trigger_dag(self, session: requests.Session, dag_id: str) -> str:
        """A manual run of `dag_id` now, as the UI's trigger button makes it; its run id."""
        posted = session.post(
            f"{self.airflow_url}/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None}, timeout=30
        )
        if posted.status_code != 200:
            raise StackError(f"Airflow refused to trigger {dag_id}: {posted.status_code} {posted.text[:300]}")
        return str(posted.json()["dag_run_id"])

    def dag_run(self, session: requests.Session, dag_id: str, run_id: str) -> dict[str, Any]:
        """The run as the REST API shows it (state, start_date, end_date, ...)."""
        got = session.get(f"{self.airflow_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}", timeout=30)
        if got.status_code != 200:
            raise StackError(f"no run {run_id} of {dag_id}: {got.status_code} {got.text[:300]}")
        return dict(got.json())


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
