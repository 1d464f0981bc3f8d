{{ config(unique_key='bucket_start') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Each road direction per 15-minute bucket, aggregated from its segments' sums (macros/road_aggregates.sql).
-- Incremental: the 15-minute buckets holding a merged snapshot are aggregated again from int_segment_15min.
{%- set spans = changed_spans('bucket') %}

{{ road_buckets('int_segment_15min', 'bucket_start', 15, spans) }}
