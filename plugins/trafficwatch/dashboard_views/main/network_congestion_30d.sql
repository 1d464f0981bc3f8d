-- The network's congestion level per hour over the 30 days before the latest hour, with the Rennes day and
-- hour for the hour-by-day view (Trends). Summed travel times, so any grouping is total / free-flow - 1.
SELECT
    timezone('Europe/Paris', n.hour_start) AS hour_local,
    strftime(n.local_date, '%Y-%m-%d ') || ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'][n.day_of_week] AS day_label,
    printf('%02dh', n.hour_of_day) AS hour_label,
    n.day_of_week,
    n.hour_of_day,
    n.measured_segments,
    n.measured_km,
    n.travel_time_s,
    n.free_flow_travel_time_s
FROM main.network_congestion_hourly AS n
WHERE n.hour_start > (SELECT max(hour_start) FROM main.network_congestion_hourly) - INTERVAL 30 DAY
