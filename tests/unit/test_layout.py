"""The shipped package stays the pipeline only: importing every module of `trafficwatch` loads neither the
development tools (`trafficwatch_dev`: the feed, the simulator, the demo's history) nor test or bench code,
and no module grows past what a newcomer reads at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "plugins" / "trafficwatch"
MAX_LINES = 500

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import trafficwatch
names = [module.name for module in pkgutil.walk_packages(trafficwatch.__path__, "trafficwatch.")]
for name in names:
    importlib.import_module(name)
foreign = sorted(name for name in sys.modules if name.split(".")[0] in ("trafficwatch_dev", "tests", "bench"))
print(json.dumps({"modules": names, "foreign": foreign}))
"""


def _imported(code: str) -> Any:
    """What `code` prints last, as JSON, run in a new interpreter with only plugins/ on the path: the package
    must import on its own, as in the image."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(REPO / "plugins"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_pipeline_imports_no_dev_test_or_bench_code() -> None:
    found = _imported(IMPORT_ALL)
    assert "trafficwatch.lake.merge" in found["modules"] and "trafficwatch.raw" in found["modules"]
    assert found["foreign"] == []


def test_no_module_of_the_package_is_over_500_lines() -> None:
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(sizes) > 20
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}


def _heavy_loaded(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of the `heavy` modules a new interpreter has loaded after `imports` (Python statements)."""
    script = f"import json, sys\n{imports}\nprint(json.dumps(sorted(n for n in {heavy!r} if n in sys.modules)))"
    return _imported(script)


LAKE_AND_BUILD = ("duckdb", "polars", "deltalake", "pyarrow", "dbt", "trafficwatch.lake", "trafficwatch.serving")
# What a DAG task or the triggerer imports to hand its work to the worker: none of the libraries that do the work.
REQUESTER_IMPORTS = """
import trafficwatch.connections, trafficwatch.errors, trafficwatch.results, trafficwatch.waiting, trafficwatch.worker
import trafficwatch.alerts  # the freshness task's
"""


def test_a_requester_of_the_worker_loads_no_lake_or_build_library() -> None:
    """~40 MiB of memory less in every merge and marts task process and in the triggerer, ~40-70 MiB in the
    freshness task's (see worker.py)."""
    assert _heavy_loaded(REQUESTER_IMPORTS, LAKE_AND_BUILD) == []


# What the local feed's process imports (`python -m trafficwatch_dev.cli feed`, a service of `make demo`).
FEED_IMPORTS = "import trafficwatch_dev.cli, trafficwatch_dev.feed"


def test_the_local_feed_loads_no_lake_library_nor_boto3() -> None:
    """The feed serves JSON: its process was 81-107 MiB of PSS in the demo stack with polars, delta-rs and boto3
    loaded (for a segment length, three API paths and a readiness check), 26 MiB of RSS at start without."""
    assert _heavy_loaded(FEED_IMPORTS, (*LAKE_AND_BUILD, "boto3", "trafficwatch.payloads")) == []
