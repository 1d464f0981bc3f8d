{{ config(materialized='view') }}
-- Observations with the attributes they were measured with (joined on the attribute version they carry)
-- and the flags every aggregate needs. A view: consumers filter it on measured_date and measured_at with
-- literals, which reach the delta scan and prune partitions.
select
    o.segment_key,
    o.measured_at,
    o.measured_date,
    o.attributes_hash,
    a.road_name,
    a.carriageway,
    a.hierarchy,
    a.speed_limit_kmh,
    a.length_m,
    o.traffic_status,
    o.speed_kmh,
    o.travel_time_s,
    o.reliability_pct,
    o.probe_count,
    -- A speed sample: a probe measured the speed. 'unknown' has no probe (its speed is a placeholder);
    -- 'impossible' is a closure, whose 0 km/h is not a slow speed: neither enters a speed or a travel time.
    o.traffic_status in ('freeFlow', 'heavy', 'congested') as is_speed_sample,
    o.traffic_status = 'impossible' as is_closed,
    o.traffic_status in ('congested', 'impossible') as is_congested,
    -- Hours per km, summed for harmonic means; a congested 0 km/h counts as 1 km/h to stay finite.
    1.0 / greatest(o.speed_kmh, 1) as hours_per_km
from {{ ref('stg_lake__traffic_observations') }} as o
left join {{ ref('int_segment_attributes') }} as a
    on o.segment_key = a.segment_key
    and o.attributes_hash = a.attributes_hash
