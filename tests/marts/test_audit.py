"""The lake's own guarantees, checked through the staging models' data tests: by the hourly audit
(`dbt_build.audit`, the marts_audit DAG, `trafficwatch audit`, which runs every model's YAML data tests over
whole tables), not by every minute's build (which runs the one guard test over the rows it rebuilt)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from deltalake import write_deltalake

from tests.conftest import SAMPLE_DATETIME, land_raw, redated
from tests.marts.fixtures import serving_config
from trafficwatch import dbt_build, lake, serving

pytestmark = pytest.mark.integration

DUPLICATES_TEST = "unique_combination_stg_lake__traffic_observations_segment_key__measured_at"


def test_a_duplicate_in_the_lake_fails_the_audit_not_the_minute_build(s3_settings, sample_bytes) -> None:
    # A snapshot of this very minute: the staging tests look at the lake's last two days.
    sampled = datetime.fromisoformat(SAMPLE_DATETIME.decode())
    body = redated(sample_bytes, int((datetime.now(UTC) - sampled).total_seconds() // 60))
    config = serving_config(s3_settings)
    assert dbt_build.audit(s3_settings, config) == {"data tests": 0}  # nothing built yet: nothing to audit
    land_raw(s3_settings, body)
    lake.merge_pending(s3_settings)
    built = serving.build(s3_settings, config)
    audited = dbt_build.audit(s3_settings, config)["data tests"]
    assert audited >= 40  # the staging models' and every other model's YAML tests
    assert built.nodes["data tests"] == 1  # the guard

    # Rows the merge would never write: the snapshot's rows again, under their own merge stamp.
    table = lake.ensure_tables(s3_settings, [lake.OBSERVATIONS])[lake.OBSERVATIONS]
    rows = lake.scan_table(table, lake.storage_options(s3_settings)).collect()
    write_deltalake(table, rows.head(10).to_arrow(), mode="append")

    rebuilt = serving.build(s3_settings, config)  # the minute's build does not scan the lake for this
    assert rebuilt.nodes["data tests"] == built.nodes["data tests"]
    with pytest.raises(dbt_build.DataTestsFailed) as failure:
        dbt_build.audit(s3_settings, config)
    assert failure.value.tests == [DUPLICATES_TEST]
    message = str(failure.value)
    assert "\n" not in message and message.startswith("dbt test failed: 1 data test(s) failed")
