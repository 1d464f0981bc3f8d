-- Reliability of each road direction per Rennes day, over the 30 days before the latest one (Trends): the FHWA
-- Urban Congestion Report indices of road_reliability_daily, with the road's main road class. A percentile
-- does not add up: the Planning Time and Buffer Indices are per day (one row per road direction and day).
SELECT
    r.road_name,
    r.direction,
    c.hierarchy,
    CAST(r.local_date AS TIMESTAMP) AS day_local,
    r.bucket_count,
    r.mean_travel_time_s,
    r.p95_travel_time_s,
    r.free_flow_travel_time_s,
    r.travel_time_index,
    r.planning_time_index,
    r.buffer_index,
    r.peak_travel_time_index,
    r.peak_planning_time_index,
    r.congested_hours,
    r.closed_segment_minutes
FROM main.road_reliability_daily AS r
LEFT JOIN main._road_class AS c USING (road_name)
WHERE r.local_date > (SELECT max(local_date) FROM main.road_reliability_daily) - INTERVAL 30 DAY
