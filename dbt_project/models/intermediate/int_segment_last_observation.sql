{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='segment_key',
        on_schema_change='fail',
    )
}}
-- The latest observation of every segment. Incremental: a build looks only at observations measured
-- after the latest one held, and replaces the rows of the segments they concern.
{%- set since = watermark('measured_at') %}

select
    segment_key,
    max(measured_at) as measured_at,
    -- Aggregates rather than a window over all rows: a full refresh reads the whole history.
    arg_max(traffic_status, measured_at) as traffic_status,
    arg_max(speed_kmh, measured_at) as speed_kmh,
    arg_max(travel_time_s, measured_at) as travel_time_s,
    arg_max(reliability_pct, measured_at) as reliability_pct,
    arg_max(probe_count, measured_at) as probe_count
from {{ ref('int_observations_enriched') }}
{%- if since %}
where {{ measured_since(since, inclusive=false) }}
{%- endif %}
group by segment_key
