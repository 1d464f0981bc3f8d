-- The typical week of every road direction, from all history: per local day of week and hour, its
-- typical speed and travel time, averaged like the road buckets (macros/road_aggregates.sql). Rebuilt
-- each time from the sums per segment and hour of the week, so its cost does not grow with history.
with segments as (
    select
        v.road_name,
        v.carriageway,
        p.day_of_week,
        p.hour_of_day,
        p.sample_count,
        p.closed_count,
        v.length_m,
        case when p.sample_count > 0 then v.length_m end as measured_length_m,
        p.sum_hours_per_km / nullif(p.sample_count, 0) as mean_hours_per_km,
        v.length_m / nullif(v.speed_limit_kmh, 0) as length_over_limit,
        coalesce(
            p.sum_travel_time_s / nullif(p.sample_count, 0),
            v.length_m / nullif(v.speed_limit_kmh, 0) * 3.6
        ) as segment_travel_time_s
    from {{ ref('int_segment_hour_of_week') }} as p
    inner join {{ ref('int_segment_versions') }} as v
        on p.segment_key = v.segment_key and v.is_current
),

directions as (
    {{ road_directions('segments') }}
)

select
    road_name,
    direction,
    day_of_week,
    hour_of_day,
    sum(measured_length_m) / nullif(sum(measured_length_m * mean_hours_per_km), 0) as typical_speed_kmh,
    sum(segment_travel_time_s) as typical_travel_time_s,
    sum(case when measured_length_m is not null then length_over_limit end)
        / nullif(sum(measured_length_m * mean_hours_per_km), 0) as typical_speed_ratio,
    cast(sum(sample_count) as integer) as sample_count,
    cast(sum(closed_count) as integer) as closed_sample_count,
    -- The sums behind the ratios (speed = measured_km / measured_hours, speed over limit =
    -- limit_hours / measured_hours), for aggregating hours of the week together.
    coalesce(sum(measured_length_m), 0) / 1000 as measured_km,
    coalesce(sum(measured_length_m * mean_hours_per_km), 0) / 1000 as measured_hours,
    coalesce(sum(case when measured_length_m is not null then length_over_limit end), 0) / 1000 as limit_hours
from directions
group by road_name, direction, day_of_week, hour_of_day
