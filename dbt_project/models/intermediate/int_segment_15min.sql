{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='bucket_start',
        on_schema_change='fail',
    )
}}
-- Additive sums per segment and 15-minute bucket, from which every speed and travel-time mart is
-- derived. Incremental: a build recomputes only the latest bucket it holds (it may have been partial)
-- and the buckets after it, replacing those buckets whole.
{%- set since = watermark('bucket_start') %}

select
    segment_key,
    {{ bucket_start('measured_at', 900) }} as bucket_start,
    arg_max(road_name, measured_at) as road_name,
    arg_max(hierarchy, measured_at) as hierarchy,
    arg_max(speed_limit_kmh, measured_at) as speed_limit_kmh,
    arg_max(length_m, measured_at) as length_m,
    cast(count(*) as integer) as observation_count,
    cast(count(*) filter (where is_measured) as integer) as sample_count,
    cast(count(*) filter (where is_congested) as integer) as congested_count,
    coalesce(sum(hours_per_km) filter (where is_measured), 0) as sum_hours_per_km,
    min(speed_kmh) filter (where is_measured) as min_speed_kmh,
    max(speed_kmh) filter (where is_measured) as max_speed_kmh,
    cast(coalesce(sum(travel_time_s) filter (where is_measured), 0) as bigint) as sum_travel_time_s,
    cast(coalesce(sum(travel_time_s) filter (where not is_measured), 0) as bigint) as unmeasured_travel_time_s,
    cast(coalesce(sum(reliability_pct) filter (where is_measured), 0) as bigint) as sum_reliability_pct
from {{ ref('int_observations_enriched') }}
{%- if since %}
where {{ measured_since(since) }}
{%- endif %}
group by segment_key, bucket_start
