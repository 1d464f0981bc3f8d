-- Pipeline health (operators only): objects kept under quarantine/, per Rennes day and stage (ingest: an
-- answer refused by the poll; merge: a raw object refused by the merge), from trafficwatch.health. Every day
-- with a merge has a row: a day without one reads 'none quarantined', 0.
WITH days AS (
    SELECT DISTINCT CAST(timezone('Europe/Paris', merged_at) AS DATE) AS day
    FROM health.snapshots
),
quarantined AS (
    SELECT
        CAST(timezone('Europe/Paris', quarantined_at) AS DATE) AS day,
        stage,
        count(*) AS objects,
        arg_max(reason, quarantined_at) AS latest_reason
    FROM health.quarantined_objects
    GROUP BY ALL
)
SELECT
    CAST(day AS TIMESTAMP) AS day_local,
    coalesce(q.stage, 'none quarantined') AS stage,
    coalesce(q.objects, 0) AS objects,
    q.latest_reason
FROM days
FULL JOIN quarantined AS q USING (day)
