-- Pipeline health (operators only): one row per object the merge took from raw/ (the lake's merge log, carried
-- into the serving file by every publish: trafficwatch.health), with when it landed, was merged and first
-- served, in Rennes local time. expected_per_hour is the upstream's cadence: 3,600 s over the median gap
-- between consecutive snapshot times. measured_at (UTC) is there for views that select a period of it: a
-- filter on it reaches the table's scan, before the local times are computed.
WITH cadence AS (
    SELECT median(gap_s) AS cadence_s
    FROM (
        SELECT epoch(measured_at) - epoch(lag(measured_at) OVER (ORDER BY measured_at)) AS gap_s
        FROM health.snapshots
        WHERE NOT refused AND measured_at IS NOT NULL
    )
)
SELECT
    s.source_key,
    s.measured_at,
    timezone('Europe/Paris', s.measured_at) AS measured_local,
    timezone('Europe/Paris', s.landed_at) AS landed_local,
    timezone('Europe/Paris', s.merged_at) AS merged_local,
    timezone('Europe/Paris', s.visible_at) AS visible_local,
    s.refused,
    s.record_count,
    s.accepted_rows,
    s.rejected_rows,
    s.duplicate_rows,
    epoch(s.merged_at) - epoch(s.landed_at) AS merge_delay_s,
    epoch(s.visible_at) - epoch(s.landed_at) AS landing_to_visible_s,
    3600 / nullif(c.cadence_s, 0) AS expected_per_hour
FROM health.snapshots AS s
CROSS JOIN cadence AS c
