-- Pipeline health (operators only): the rows of health.pipeline_snapshots measured in the 7 days before the
-- newest one, for the hourly landing chart. Over the whole 30-day window that chart was 720 hourly points,
-- denser than its width shows, and Superset's pivot of each point (pure-Python per hour and metric) made it
-- the slowest chart of the dashboards.
SELECT *
FROM health.pipeline_snapshots
WHERE measured_at > (SELECT max(measured_at) FROM health.snapshots) - INTERVAL 7 DAY
