{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='bucket_start',
        on_schema_change='fail',
    )
}}
-- Each road (a `road_name`) per 15-minute bucket, aggregated from its segments' sums; see
-- road_aggregates() for how the averages are taken. Incremental like int_segment_15min.
{%- set since = watermark('bucket_start') %}

with segments as (
    select
        road_name,
        bucket_start,
        min_speed_kmh,
        max_speed_kmh,
        sample_count,
        {{ segment_means() }}
    from {{ ref('int_segment_15min') }}
    {%- if since %}
    where bucket_start >= {{ since }}
    {%- endif %}
)

select
    road_name,
    bucket_start,
    -- Stored once per row, so that joining the typical values when the mart is read costs no time zone work.
    {{ local_day_of_week('bucket_start') }} as day_of_week,
    {{ local_hour_of_day('bucket_start') }} as hour_of_day,
    {{ road_aggregates() }}
from segments
group by road_name, bucket_start
