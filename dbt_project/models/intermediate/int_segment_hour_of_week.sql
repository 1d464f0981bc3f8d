{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['segment_key', 'day_of_week', 'hour_of_day'],
        on_schema_change='fail',
    )
}}
-- Running sums per segment and hour of the week (local clock) over all history: the typical values
-- are ratios of these sums. Incremental: each build adds the observations measured after the latest
-- one already counted, so every observation is counted once and the cost follows the new data.
{%- set since = watermark('latest_measured_at') %}

-- Summed per UTC hour first, then per local hour of the week: Europe/Paris is a whole number of hours
-- from UTC, so an hour maps to one local hour, and the time zone is converted per hour, not per row.
with new_hours as (
    select
        segment_key,
        {{ bucket_start('measured_at', 3600) }} as hour_start,
        count(*) as observation_count,
        count(*) filter (where is_measured) as sample_count,
        coalesce(sum(hours_per_km) filter (where is_measured), 0) as sum_hours_per_km,
        coalesce(sum(travel_time_s) filter (where is_measured), 0) as sum_travel_time_s,
        coalesce(sum(travel_time_s) filter (where not is_measured), 0) as unmeasured_travel_time_s,
        max(measured_at) as latest_measured_at
    from {{ ref('int_observations_enriched') }}
    {%- if since %}
    where {{ measured_since(since, inclusive=false) }}
    {%- endif %}
    group by segment_key, hour_start
),

new_samples as (
    select
        segment_key,
        {{ local_day_of_week('hour_start') }} as day_of_week,
        {{ local_hour_of_day('hour_start') }} as hour_of_day,
        cast(sum(observation_count) as bigint) as observation_count,
        cast(sum(sample_count) as bigint) as sample_count,
        sum(sum_hours_per_km) as sum_hours_per_km,
        cast(sum(sum_travel_time_s) as bigint) as sum_travel_time_s,
        cast(sum(unmeasured_travel_time_s) as bigint) as unmeasured_travel_time_s,
        max(latest_measured_at) as latest_measured_at
    from new_hours
    group by all
)

{% if is_incremental() -%}
select
    n.segment_key,
    n.day_of_week,
    n.hour_of_day,
    n.observation_count + coalesce(o.observation_count, 0) as observation_count,
    n.sample_count + coalesce(o.sample_count, 0) as sample_count,
    n.sum_hours_per_km + coalesce(o.sum_hours_per_km, 0) as sum_hours_per_km,
    n.sum_travel_time_s + coalesce(o.sum_travel_time_s, 0) as sum_travel_time_s,
    n.unmeasured_travel_time_s + coalesce(o.unmeasured_travel_time_s, 0) as unmeasured_travel_time_s,
    greatest(n.latest_measured_at, o.latest_measured_at) as latest_measured_at
from new_samples as n
left join {{ this }} as o
    on n.segment_key = o.segment_key
    and n.day_of_week = o.day_of_week
    and n.hour_of_day = o.hour_of_day
{%- else -%}
select * from new_samples
{%- endif %}
