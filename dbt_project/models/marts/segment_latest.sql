-- One row per segment: its latest observation, its current attributes and geometry, whether it is
-- closed, and how it compares with its limit, its free-flow speed and its typical speed at this hour of
-- the week. Rebuilt each time from small inputs (one row per segment, one per segment and hour of week).
-- The path a map draws (paths): the geometry's points as one list of [lon, lat], the parts of a MultiLineString
-- one after the other, thinned twice (thinning_pass: no point of the geometry ends up more than 1 m from the
-- path drawn) and rounded to 6 decimals (0.11 m). A viewer's browser draws every line piece of both maps (in
-- software WebGL where there is no GPU), and the source's 15-17 significant digits nearly doubled what the maps
-- send: on the real network 41 % fewer pieces, 707 -> 259 KB. geometry_geojson is kept whole. In this query, not
-- an ephemeral model: dbt does not inject an ephemeral model again when the worker reuses its parsed manifest.
with parts as (
    select
        segment_key,
        case json_extract_string(geometry_geojson, '$.type')
            when 'MultiLineString' then cast(json_extract(geometry_geojson, '$.coordinates') as double[][][])
            else [cast(json_extract(geometry_geojson, '$.coordinates') as double[][])]
        end as parts
    from {{ ref('int_segment_versions') }}
    where is_current
),

part_rows as (
    select segment_key, unnest(parts) as part, generate_subscripts(parts, 1) as part_no
    from parts
),

points as (
    select segment_key, part_no, point_no, point[1] as lon, point[2] as lat
    from (
        select segment_key, part_no, unnest(part) as point, generate_subscripts(part, 1) as point_no
        from part_rows
    )
),

thinned_once as (
    {{ thinning_pass('points', 0.5) }}
),

thinned_twice as (
    {{ thinning_pass('thinned_once', 0.5) }}
),

paths as (
    select
        segment_key,
        to_json(list([round(lon, 6), round(lat, 6)] order by part_no, point_no))::varchar as path_json
    from thinned_twice
    group by segment_key
),

latest as (
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
    p.path_json
from {{ ref('int_segment_versions') }} as s
inner join latest as l on s.segment_key = l.segment_key
left join paths as p on s.segment_key = p.segment_key
left join {{ ref('segment_free_flow') }} as f on s.segment_key = f.segment_key
left join typical as t
    on l.segment_key = t.segment_key
    and l.day_of_week = t.day_of_week
    and l.hour_of_day = t.hour_of_day
where s.is_current
