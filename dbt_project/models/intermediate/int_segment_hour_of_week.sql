{{ config(unique_key='hour_of_week') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Sums per segment and hour of the week (local clock) over all history: the typical values are ratios
-- of these sums. Incremental: the hours of the week holding a merged snapshot are summed again from the
-- hourly sums (a scan of one row per segment and hour, no lake read), so each hour is counted once.
{%- set spans = changed_spans('hour') %}

select
    segment_key,
    -- One key for the delete+insert: (day_of_week - 1) * 24 + hour_of_day.
    (day_of_week - 1) * 24 + hour_of_day as hour_of_week,
    day_of_week,
    hour_of_day,
    cast(sum(observation_count) as bigint) as observation_count,
    cast(sum(sample_count) as bigint) as sample_count,
    cast(sum(closed_count) as bigint) as closed_count,
    sum(sum_hours_per_km) as sum_hours_per_km,
    cast(sum(sum_travel_time_s) as bigint) as sum_travel_time_s
from {{ ref('int_segment_hourly') }}
{%- if spans is not none %}
where (day_of_week, hour_of_day) in (
    select distinct day_of_week, hour_of_day
    from {{ ref('int_segment_hourly') }}
    where {{ in_spans('hour_start', spans) }}
)
{%- endif %}
group by segment_key, day_of_week, hour_of_day
