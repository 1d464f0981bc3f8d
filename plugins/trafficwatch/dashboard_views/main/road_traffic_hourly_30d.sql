-- Per road direction and hour over the 30 days before the latest hour, in Rennes local time (Trends
-- dashboard). Metrics aggregate the sums behind the means: a daily speed is not an average of hourly ones.
SELECT
    r.road_name,
    r.direction,
    c.hierarchy,
    timezone('Europe/Paris', r.hour_start) AS hour_local,
    r.segment_count,
    r.mean_speed_kmh,
    r.travel_time_s,
    r.congested_share,
    r.closed_share,
    r.closed_segment_minutes,
    r.measured_km,
    r.measured_hours,
    r.status_km,
    r.congested_km,
    r.closed_km,
    r.typical_speed_kmh,
    r.typical_travel_time_s,
    r.typical_measured_km,
    r.typical_measured_hours
FROM main.road_traffic_hourly AS r
LEFT JOIN main._road_class AS c USING (road_name)
WHERE r.hour_start > (SELECT max(hour_start) FROM main.road_traffic_hourly) - INTERVAL 30 DAY
