{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='bucket_start',
        on_schema_change='fail',
    )
}}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Each road direction per 15-minute bucket, aggregated from its segments' sums (macros/road_aggregates.sql).
-- Incremental: the 15-minute buckets holding a merged snapshot are aggregated again from int_segment_15min.
{%- set spans = changed_spans('bucket') %}

with segments as (
    select
        road_name,
        carriageway,
        bucket_start as bucket_start,
        length_m,
        min_speed_kmh,
        max_speed_kmh,
        sample_count,
        closed_count,
        {{ segment_means(15) }}
    from {{ ref('int_segment_15min') }}
    {%- if spans is not none %}
    where {{ in_spans('bucket_start', spans) }}
    {%- endif %}
),

directions as (
    {{ road_directions('segments', ['bucket_start']) }}
)

select
    road_name,
    direction,
    bucket_start,
    -- Stored once per row, so that joining the typical week when the mart is read costs no time zone work.
    {{ local_date('bucket_start') }} as local_date,
    {{ local_day_of_week('bucket_start') }} as day_of_week,
    {{ local_hour_of_day('bucket_start') }} as hour_of_day,
    {{ road_aggregates() }}
from directions
group by road_name, direction, bucket_start
