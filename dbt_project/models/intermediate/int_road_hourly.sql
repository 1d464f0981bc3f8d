{{ config(unique_key='hour_start') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Each road direction per hour, aggregated from its segments' sums (macros/road_aggregates.sql).
-- Incremental: the hours holding a merged snapshot are aggregated again from int_segment_hourly.
{%- set spans = changed_spans('hour') %}

{{ road_buckets('int_segment_hourly', 'hour_start', 60, spans) }}
