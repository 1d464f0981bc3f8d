-- Each current segment's free-flow speed: the off-peak percentile when enough samples stand behind it,
-- else its speed limit (flagged), and the free-flow travel time over its length.
with segments as (
    select
        v.segment_key,
        v.road_name,
        v.carriageway,
        v.speed_limit_kmh,
        v.length_m,
        f.off_peak_speed_kmh,
        coalesce(f.off_peak_sample_count, 0) as off_peak_sample_count,
        coalesce(f.off_peak_sample_count, 0) < {{ var('free_flow_min_samples') }} as is_limit_fallback
    from {{ ref('int_segment_versions') }} as v
    left join {{ ref('int_segment_free_flow') }} as f on v.segment_key = f.segment_key
    where v.is_current
)

select
    *,
    case when is_limit_fallback then speed_limit_kmh else off_peak_speed_kmh end as free_flow_speed_kmh,
    length_m / nullif(case when is_limit_fallback then speed_limit_kmh else off_peak_speed_kmh end, 0) * 3.6
        as free_flow_travel_time_s
from segments
