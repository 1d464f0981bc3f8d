-- Pipeline health (operators only): the build log, one row per publish of the serving file (trafficwatch.health),
-- in Rennes local time. publish_seconds runs from the end of dbt to the writing of this row (the file's
-- fsync and rename after it are not counted).
SELECT
    timezone('Europe/Paris', b.built_at) AS built_local,
    b.dbt_seconds,
    b.publish_seconds,
    b.dbt_seconds + b.publish_seconds AS build_seconds,
    CASE WHEN b.full_publish THEN 'whole copy' ELSE 'patched' END AS publish_kind,
    b.serving_rows,
    b.snapshots_made_visible,
    timezone('Europe/Paris', b.latest_measured_at) AS latest_measured_local,
    timezone('Europe/Paris', b.latest_landed_at) AS latest_landed_local
FROM health.build_log AS b
