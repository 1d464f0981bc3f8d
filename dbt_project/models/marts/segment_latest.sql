-- One row per segment: its latest observation, its current attributes and geometry, whether it is
-- closed, and how it compares with its limit, its free-flow speed and its typical speed at this hour of
-- the week. Rebuilt each time from small inputs (one row per segment, one per segment and hour of week).
with latest as (
    select
        *,
        {{ local_day_of_week('measured_at') }} as day_of_week,
        {{ local_hour_of_day('measured_at') }} as hour_of_day,
        traffic_status in ('freeFlow', 'heavy', 'congested') as is_speed_sample
    from {{ ref('int_segment_last_observation') }}
),

typical as (
    select
        segment_key,
        day_of_week,
        hour_of_day,
        sample_count / nullif(sum_hours_per_km, 0) as typical_speed_kmh
    from {{ ref('int_segment_hour_of_week') }}
    where sample_count > 0
)

select
    s.segment_key,
    s.road_name,
    s.carriageway,
    s.hierarchy,
    s.insee,
    s.speed_limit_kmh,
    l.traffic_status,
    l.speed_kmh,
    l.travel_time_s,
    l.reliability_pct,
    l.probe_count,
    l.measured_at,
    date_diff('millisecond', l.measured_at, now()) / 60000.0 as minutes_since_update,
    l.traffic_status = 'impossible' as is_closed,
    -- Without a speed sample (no probe, or closed) there is no speed to compare.
    case when l.is_speed_sample then l.speed_kmh / nullif(s.speed_limit_kmh, 0) end as speed_ratio,
    f.free_flow_speed_kmh,
    f.is_limit_fallback as free_flow_is_limit,
    case when l.is_speed_sample then l.speed_kmh / nullif(f.free_flow_speed_kmh, 0) end as free_flow_speed_ratio,
    t.typical_speed_kmh,
    case when l.is_speed_sample then l.speed_kmh - t.typical_speed_kmh end as speed_vs_typical_kmh,
    s.length_m,
    s.geometry_geojson,
    {{ path_json('s.geometry_geojson') }} as path_json
from {{ ref('int_segment_versions') }} as s
inner join latest as l on s.segment_key = l.segment_key
left join {{ ref('segment_free_flow') }} as f on s.segment_key = f.segment_key
left join typical as t
    on l.segment_key = t.segment_key
    and l.day_of_week = t.day_of_week
    and l.hour_of_day = t.hour_of_day
where s.is_current
