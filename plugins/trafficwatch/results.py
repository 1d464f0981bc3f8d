"""What a merge, a marts build and the lake's maintenance report: plain data, rebuilt from JSON by whoever asked
the worker for them.

They live apart from the lake and the build (`lake.merge`, `lake.maintenance`, `serving`) so that a requester, a
DAG task or the triggerer handing its work to the worker (`trafficwatch.worker`), never imports DuckDB, polars or
delta-rs: about 40 MiB of memory per process that only waits for an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass
class MergeResult:
    merged_objects: int = 0
    observations: int = 0
    rejected_rows: int = 0
    duplicate_rows: int = 0
    quarantined_objects: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {
            "merged_objects": self.merged_objects,
            "observations": self.observations,
            "rejected_rows": self.rejected_rows,
            "duplicate_rows": self.duplicate_rows,
            "quarantined_objects": self.quarantined_objects,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, int | float]) -> MergeResult:
        return cls(**data)  # type: ignore[arg-type]

    def summary(self) -> str:
        if not self.merged_objects and not self.quarantined_objects:
            return "nothing to merge: every landed snapshot is already in the lake"
        return (
            f"merged {self.merged_objects} snapshots: {self.observations} observations accepted, "
            f"{self.rejected_rows} rows rejected, {self.duplicate_rows} duplicate rows dropped, "
            f"{self.quarantined_objects} unreadable objects quarantined, in {self.seconds:.1f} s"
        )


@dataclass
class BuildResult:
    serving_db: Path
    built_at: datetime
    latest_measured_at: datetime | None
    nodes: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    full_publish: bool = True
    dbt_seconds: float = 0.0
    publish_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "serving_db": str(self.serving_db),
            "built_at": self.built_at.isoformat(),
            "latest_measured_at": self.latest_measured_at.isoformat() if self.latest_measured_at else None,
            "nodes": self.nodes,
            "rows": self.rows,
            "full_publish": self.full_publish,
            "dbt_seconds": round(self.dbt_seconds, 3),
            "publish_seconds": round(self.publish_seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildResult:
        """The inverse of `as_dict` (a build done by the worker process comes back as JSON)."""
        latest = data["latest_measured_at"]
        return cls(
            serving_db=Path(data["serving_db"]),
            built_at=datetime.fromisoformat(data["built_at"]),
            latest_measured_at=datetime.fromisoformat(latest) if latest else None,
            nodes=data["nodes"],
            rows=data["rows"],
            full_publish=data["full_publish"],
            dbt_seconds=data["dbt_seconds"],
            publish_seconds=data["publish_seconds"],
        )

    def summary(self) -> str:
        nodes = ", ".join(f"{count} {kind}" for kind, count in sorted(self.nodes.items()))
        latest = self.latest_measured_at.isoformat() if self.latest_measured_at else "no data"
        return (
            f"built {nodes} in {self.dbt_seconds:.1f} s; published {len(self.rows)} marts "
            f"({'whole copy' if self.full_publish else 'patched'}, "
            f"{sum(self.rows.values()):,} rows, latest measurement {latest}) to {self.serving_db} "
            f"in {self.publish_seconds:.1f} s"
        )


@dataclass
class MaintenanceResult:
    compacted: dict[str, int]
    vacuumed_files: dict[str, int]
    expired_raw_objects: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "compacted": self.compacted,
            "vacuumed_files": self.vacuumed_files,
            "expired_raw_objects": self.expired_raw_objects,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaintenanceResult:
        return cls(**data)

    def summary(self) -> str:
        return (
            f"compacted {sum(self.compacted.values())} files into fewer, vacuumed "
            f"{sum(self.vacuumed_files.values())} unreferenced files, expired {self.expired_raw_objects} raw objects"
        )
