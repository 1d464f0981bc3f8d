{{ config(unique_key='local_date') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Each road direction per local day (a Rennes day, local midnight to midnight: 92 or 100 buckets on the
-- days the clocks change): the distribution of its 15-minute travel times, all day and in the weekday
-- peaks, and its hourly travel times. The free-flow reference moves with history, so the indices that
-- divide by it are computed when read (road_reliability_daily). Incremental: the local days holding a
-- merged snapshot are aggregated again.
{%- set spans = changed_spans('local_day') %}
{%- set morning, evening = var('morning_peak_local_hours'), var('evening_peak_local_hours') %}

with buckets as (
    select
        *,
        day_of_week <= 5 and (
            hour_of_day >= {{ morning[0] }} and hour_of_day < {{ morning[1] }}
            or hour_of_day >= {{ evening[0] }} and hour_of_day < {{ evening[1] }}
        ) as is_peak
    from {{ ref('int_road_15min') }}
    {%- if spans is not none %}
    where {{ in_spans('bucket_start', spans) }}
    {%- endif %}
),

days as (
    select
        road_name,
        direction,
        local_date,
        any_value(day_of_week) as day_of_week,
        cast(count(*) as integer) as bucket_count,
        avg(travel_time_s) as mean_travel_time_s,
        quantile_cont(travel_time_s, 0.95) as p95_travel_time_s,
        cast(count(*) filter (where is_peak) as integer) as peak_bucket_count,
        avg(travel_time_s) filter (where is_peak) as peak_mean_travel_time_s,
        quantile_cont(travel_time_s, 0.95) filter (where is_peak) as peak_p95_travel_time_s,
        sum(closed_segment_minutes) as closed_segment_minutes
    from buckets
    group by road_name, direction, local_date
),

hours as (
    select
        road_name,
        direction,
        local_date,
        list(travel_time_s order by hour_start) as hourly_travel_times_s
    from {{ ref('int_road_hourly') }}
    {%- if spans is not none %}
    where {{ in_spans('hour_start', spans) }}
    {%- endif %}
    group by road_name, direction, local_date
)

select d.*, h.hourly_travel_times_s
from days as d
left join hours as h using (road_name, direction, local_date)
