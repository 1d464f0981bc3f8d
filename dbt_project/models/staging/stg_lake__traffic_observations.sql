-- The lake's observations as they are: a view, so a consumer's filter on measured_date / measured_at
-- reaches the delta scan and prunes partitions and files.
select
    segment_key,
    measured_at,
    measured_date,
    speed_kmh,
    travel_time_s,
    reliability_pct,
    traffic_status,
    probe_count,
    attributes_hash,
    source_key,
    merged_at
from {{ source('lake', 'traffic_observations') }}
