-- Pipeline health (operators only): rows the merge rejected, per Rennes day and reason (rejected_records,
-- carried into the serving file by trafficwatch.health). Every day with a merge has a row: a day without a
-- rejected row reads 'none rejected', 0, so a healthy pipeline shows zeros rather than no data.
WITH days AS (
    SELECT DISTINCT CAST(timezone('Europe/Paris', merged_at) AS DATE) AS day
    FROM health.snapshots
),
rejected AS (
    SELECT CAST(timezone('Europe/Paris', rejected_at) AS DATE) AS day, reason, sum(row_count) AS rejected_rows
    FROM health.rejected_rows
    GROUP BY ALL
)
SELECT
    CAST(day AS TIMESTAMP) AS day_local,
    coalesce(r.reason, 'none rejected') AS reason,
    coalesce(r.rejected_rows, 0) AS rejected_rows
FROM days
FULL JOIN rejected AS r USING (day)
