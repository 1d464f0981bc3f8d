{{ config(materialized='view') }}
-- Each road direction per hour beside its typical values for that hour of the week. A view over the
-- incremental int_road_hourly: the typical values come from the all-history profile, which moves with
-- every build, so they are joined when read rather than frozen into old rows.
select
    r.road_name,
    r.direction,
    r.hour_start,
    r.day_of_week,
    r.hour_of_day,
    r.segment_count,
    r.length_m,
    r.mean_speed_kmh,
    r.min_speed_kmh,
    r.max_speed_kmh,
    r.travel_time_s,
    r.measured_length_share,
    r.mean_reliability_pct,
    r.sample_count,
    r.closed_sample_count,
    r.congested_share,
    r.closed_share,
    r.closed_segment_minutes,
    r.measured_km,
    r.measured_hours,
    r.status_km,
    r.congested_km,
    r.closed_km,
    p.typical_speed_kmh,
    p.typical_travel_time_s,
    p.measured_km as typical_measured_km,
    p.measured_hours as typical_measured_hours
from {{ ref('int_road_hourly') }} as r
left join {{ ref('road_hour_of_week_profile') }} as p
    on r.road_name = p.road_name
    and r.direction = p.direction
    and r.day_of_week = p.day_of_week
    and r.hour_of_day = p.hour_of_day
