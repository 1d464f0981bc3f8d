{{ config(materialized='view') }}
-- Each road per hour beside its typical values for that hour of the week; a view over the incremental
-- int_road_hourly for the same reason as road_traffic_15min.
select
    r.road_name,
    r.hour_start,
    r.segment_count,
    r.mean_speed_kmh,
    r.min_speed_kmh,
    r.max_speed_kmh,
    r.travel_time_s,
    r.mean_reliability_pct,
    r.sample_count,
    r.congested_share,
    p.typical_speed_kmh,
    p.typical_travel_time_s
from {{ ref('int_road_hourly') }} as r
left join {{ ref('road_hour_of_week_profile') }} as p
    on r.road_name = p.road_name
    and r.day_of_week = p.day_of_week
    and r.hour_of_day = p.hour_of_day
