{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='hour_start',
        on_schema_change='fail',
    )
}}
-- Each road per hour: the segments' 15-minute sums added up per hour, then aggregated like the
-- 15-minute road buckets. Incremental: recomputes the latest hour it holds and the hours after it.
{%- set since = watermark('hour_start') %}

with segment_hours as (
    select
        segment_key,
        {{ bucket_start('bucket_start', 3600) }} as hour_start,
        arg_max(road_name, bucket_start) as road_name,
        arg_max(length_m, bucket_start) as length_m,
        sum(observation_count) as observation_count,
        sum(sample_count) as sample_count,
        sum(congested_count) as congested_count,
        sum(sum_hours_per_km) as sum_hours_per_km,
        min(min_speed_kmh) as min_speed_kmh,
        max(max_speed_kmh) as max_speed_kmh,
        sum(sum_travel_time_s) as sum_travel_time_s,
        sum(unmeasured_travel_time_s) as unmeasured_travel_time_s,
        sum(sum_reliability_pct) as sum_reliability_pct
    from {{ ref('int_segment_15min') }}
    {%- if since %}
    where bucket_start >= {{ since }}
    {%- endif %}
    group by segment_key, hour_start
),

segments as (
    select
        road_name,
        hour_start,
        min_speed_kmh,
        max_speed_kmh,
        sample_count,
        {{ segment_means() }}
    from segment_hours
)

select
    road_name,
    hour_start,
    -- Stored once per row, so that joining the typical values when the mart is read costs no time zone work.
    {{ local_day_of_week('hour_start') }} as day_of_week,
    {{ local_hour_of_day('hour_start') }} as hour_of_day,
    {{ road_aggregates() }}
from segments
group by road_name, hour_start
