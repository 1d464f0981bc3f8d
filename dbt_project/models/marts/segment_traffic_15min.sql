{{ config(materialized='view') }}
-- Speed, travel time and closure time per segment and 15-minute bucket, for the buckets in which the
-- segment had a status (a speed sample or a closure). A view over the incremental int_segment_15min.
select
    segment_key,
    road_name,
    carriageway,
    hierarchy,
    bucket_start,
    sample_count / nullif(sum_hours_per_km, 0) as mean_speed_kmh,
    min_speed_kmh,
    max_speed_kmh,
    sum_travel_time_s / nullif(sample_count, 0) as mean_travel_time_s,
    sum_reliability_pct / nullif(sample_count, 0) as mean_reliability_pct,
    sample_count,
    closed_count as closed_sample_count,
    (congested_count + closed_count) / (sample_count + closed_count) as congested_share,
    closed_count / (sample_count + closed_count) as closed_share,
    15 * closed_count / (sample_count + closed_count) as closed_minutes
from {{ ref('int_segment_15min') }}
where sample_count + closed_count > 0
