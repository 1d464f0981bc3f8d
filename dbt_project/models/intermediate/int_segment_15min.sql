{{ config(unique_key='bucket_start') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Additive sums per segment and 15-minute bucket, from which every speed and travel-time mart is
-- derived. Incremental: the buckets holding a snapshot merged since the last build (int_lake_changes),
-- late or not, are recomputed from all the lake's rows in them and replace the stored ones whole.
{%- set spans = changed_spans('bucket') %}

select
    segment_key,
    {{ bucket_start('measured_at', 900) }} as bucket_start,
    {{ latest_values(['road_name', 'carriageway', 'hierarchy', 'speed_limit_kmh', 'length_m'], 'measured_at') }},
    cast(count(*) as integer) as observation_count,
    cast(count(*) filter (where is_speed_sample) as integer) as sample_count,
    cast(count(*) filter (where traffic_status = 'congested') as integer) as congested_count,
    cast(count(*) filter (where is_closed) as integer) as closed_count,
    coalesce(sum(hours_per_km) filter (where is_speed_sample), 0) as sum_hours_per_km,
    min(speed_kmh) filter (where is_speed_sample) as min_speed_kmh,
    max(speed_kmh) filter (where is_speed_sample) as max_speed_kmh,
    cast(coalesce(sum(travel_time_s) filter (where is_speed_sample), 0) as bigint) as sum_travel_time_s,
    cast(coalesce(sum(reliability_pct) filter (where is_speed_sample), 0) as bigint) as sum_reliability_pct,
    -- The measured speeds of an off-peak bucket, for the free-flow percentile (null in other buckets).
    case
        when {{ is_off_peak('bucket_start') }}
            then coalesce(list(speed_kmh order by speed_kmh) filter (where is_speed_sample), [])
    end as off_peak_speeds
from {{ ref('int_observations_enriched') }}
{%- if spans is not none %}
where {{ lake_rows_in_spans(spans) }}
{%- endif %}
group by segment_key, bucket_start
