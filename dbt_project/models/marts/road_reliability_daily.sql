{{ config(materialized='view') }}
-- Reliability of every road direction per local day (FHWA Urban Congestion Report indices): its travel
-- times of the day (int_road_daily) against its free-flow travel time, the sum of its segments' free-flow
-- travel times along the direction. A view: the free-flow reference moves with history.
with segments as (
    select road_name, carriageway, length_m, free_flow_travel_time_s, is_limit_fallback
    from {{ ref('segment_free_flow') }}
),

directions as (
    {{ road_directions('segments') }}
),

free_flow as (
    select
        road_name,
        direction,
        sum(free_flow_travel_time_s) as free_flow_travel_time_s,
        sum(length_m) filter (where is_limit_fallback) / sum(length_m) as free_flow_limit_share
    from directions
    group by road_name, direction
)

select
    d.road_name,
    d.direction,
    d.local_date,
    d.day_of_week,
    d.bucket_count,
    d.mean_travel_time_s,
    d.p95_travel_time_s,
    f.free_flow_travel_time_s,
    coalesce(f.free_flow_limit_share, 0) as free_flow_limit_share,
    d.mean_travel_time_s / f.free_flow_travel_time_s as travel_time_index,
    d.p95_travel_time_s / f.free_flow_travel_time_s as planning_time_index,
    (d.p95_travel_time_s - d.mean_travel_time_s) / d.mean_travel_time_s as buffer_index,
    d.peak_bucket_count,
    d.peak_mean_travel_time_s / f.free_flow_travel_time_s as peak_travel_time_index,
    d.peak_p95_travel_time_s / f.free_flow_travel_time_s as peak_planning_time_index,
    (d.peak_p95_travel_time_s - d.peak_mean_travel_time_s) / d.peak_mean_travel_time_s as peak_buffer_index,
    cast(len(list_filter(
        d.hourly_travel_times_s, hourly -> hourly * {{ var('congested_hour_speed_ratio') }} > f.free_flow_travel_time_s
    )) as integer) as congested_hours,
    cast(len(d.hourly_travel_times_s) as integer) as hours_with_data,
    d.closed_segment_minutes
from {{ ref('int_road_daily') }} as d
left join free_flow as f using (road_name, direction)
