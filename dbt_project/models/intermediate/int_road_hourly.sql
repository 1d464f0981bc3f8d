{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='hour_start',
        on_schema_change='fail',
    )
}}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Each road direction per hour, aggregated from its segments' sums (macros/road_aggregates.sql).
-- Incremental: the hours holding a merged snapshot are aggregated again from int_segment_hourly.
{%- set spans = changed_spans('hour') %}

with segments as (
    select
        road_name,
        carriageway,
        hour_start as hour_start,
        length_m,
        min_speed_kmh,
        max_speed_kmh,
        sample_count,
        closed_count,
        {{ segment_means(60) }}
    from {{ ref('int_segment_hourly') }}
    {%- if spans is not none %}
    where {{ in_spans('hour_start', spans) }}
    {%- endif %}
),

directions as (
    {{ road_directions('segments', ['hour_start']) }}
)

select
    road_name,
    direction,
    hour_start,
    -- Stored once per row, so that joining the typical week when the mart is read costs no time zone work.
    {{ local_date('hour_start') }} as local_date,
    {{ local_day_of_week('hour_start') }} as day_of_week,
    {{ local_hour_of_day('hour_start') }} as hour_of_day,
    {{ road_aggregates() }}
from directions
group by road_name, direction, hour_start
