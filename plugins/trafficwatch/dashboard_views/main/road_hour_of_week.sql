-- The typical week of each road direction: one row per road direction, day of week and hour, with sortable
-- labels. Metrics are ratios of sums, so several roads or directions aggregate without averaging averages.
SELECT
    p.road_name,
    p.direction,
    c.hierarchy,
    p.day_of_week,
    p.hour_of_day,
    printf('%d %s', p.day_of_week, ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'][p.day_of_week]) AS day_label,
    printf('%02dh', p.hour_of_day) AS hour_label,
    p.typical_speed_kmh,
    p.typical_travel_time_s,
    p.typical_speed_ratio,
    p.sample_count,
    p.measured_km,
    p.measured_hours,
    p.limit_hours
FROM main.road_hour_of_week_profile AS p
LEFT JOIN main._road_class AS c USING (road_name)
