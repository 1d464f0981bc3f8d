-- Observations with the segment version in force when they were measured, and the flags and
-- reciprocal speed that every aggregate needs. A view: consumers filter it on measured_date and
-- measured_at, and those filters reach the delta scan.
select
    o.segment_key,
    o.measured_at,
    o.measured_date,
    v.road_name,
    v.hierarchy,
    v.speed_limit_kmh,
    v.length_m,
    o.traffic_status,
    o.speed_kmh,
    o.travel_time_s,
    o.reliability_pct,
    o.probe_count,
    -- 'unknown' means no probe: its speed is a placeholder (about the limit), not a measurement.
    o.traffic_status <> 'unknown' as is_measured,
    o.traffic_status in ('congested', 'impossible') as is_congested,
    -- Hours per km, summed for harmonic means; a standstill counts as 1 km/h to stay finite.
    1.0 / greatest(o.speed_kmh, 1) as hours_per_km
from {{ ref('stg_lake__traffic_observations') }} as o
inner join {{ ref('int_segment_versions') }} as v
    on o.segment_key = v.segment_key
    and o.measured_at >= v.effective_from
    and o.measured_at < v.effective_to
