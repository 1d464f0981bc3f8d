{{ config(unique_key='hour_start') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- The segments' 15-minute sums added up per UTC hour, with the hour's place on the local clock.
-- Incremental: the hours holding a merged snapshot are recomputed from their four buckets.
{%- set spans = changed_spans('hour') %}

with hours as (
    select
        segment_key,
        {{ bucket_start('bucket_start', 3600) }} as hour_start,
        {{ latest_values(['road_name', 'carriageway', 'speed_limit_kmh', 'length_m'], 'bucket_start') }},
        cast(sum(observation_count) as integer) as observation_count,
        cast(sum(sample_count) as integer) as sample_count,
        cast(sum(congested_count) as integer) as congested_count,
        cast(sum(closed_count) as integer) as closed_count,
        sum(sum_hours_per_km) as sum_hours_per_km,
        min(min_speed_kmh) as min_speed_kmh,
        max(max_speed_kmh) as max_speed_kmh,
        cast(sum(sum_travel_time_s) as bigint) as sum_travel_time_s,
        cast(sum(sum_reliability_pct) as bigint) as sum_reliability_pct
    from {{ ref('int_segment_15min') }}
    {%- if spans is not none %}
    where {{ in_spans('bucket_start', spans) }}
    {%- endif %}
    group by segment_key, hour_start
)

-- Europe/Paris is a whole number of hours from UTC: a UTC hour is one local hour.
select
    *,
    {{ local_date('hour_start') }} as local_date,
    {{ local_day_of_week('hour_start') }} as day_of_week,
    {{ local_hour_of_day('hour_start') }} as hour_of_day
from hours
