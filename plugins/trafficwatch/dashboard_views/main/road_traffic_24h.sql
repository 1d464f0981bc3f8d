-- Per road direction, 15-minute buckets over the 24 hours before the latest bucket (not before "now": a
-- replayed or stalled feed still shows its last day), in Rennes local time, with the road's main road class.
-- Metrics aggregate the sums behind the means (docs/traffic-measures.md): never an average of averages.
SELECT
    r.road_name,
    r.direction,
    c.hierarchy,
    timezone('Europe/Paris', r.bucket_start) AS bucket_local,
    r.segment_count,
    r.mean_speed_kmh,
    r.travel_time_s,
    r.mean_reliability_pct,
    r.congested_share,
    r.closed_share,
    r.measured_km,
    r.measured_hours,
    r.status_km,
    r.congested_km,
    r.closed_km,
    r.typical_speed_kmh,
    r.typical_travel_time_s,
    r.typical_measured_km,
    r.typical_measured_hours
FROM main.road_traffic_15min AS r
LEFT JOIN main._road_class AS c USING (road_name)
WHERE r.bucket_start > (SELECT max(bucket_start) FROM main.road_traffic_15min) - INTERVAL 24 HOUR
