{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='bucket_start',
        on_schema_change='fail',
    )
}}
-- Speed and travel time per segment and 15-minute bucket, for the buckets in which the segment had at
-- least one measured sample. Incremental: the latest bucket held and the later ones are rebuilt.
{%- set since = watermark('bucket_start') %}

select
    segment_key,
    road_name,
    hierarchy,
    bucket_start,
    sample_count / sum_hours_per_km as mean_speed_kmh,
    min_speed_kmh,
    max_speed_kmh,
    sum_travel_time_s / sample_count as mean_travel_time_s,
    sum_reliability_pct / sample_count as mean_reliability_pct,
    sample_count,
    congested_count / sample_count as congested_share
from {{ ref('int_segment_15min') }}
where sample_count > 0
{%- if since %}
    and bucket_start >= {{ since }}
{%- endif %}
