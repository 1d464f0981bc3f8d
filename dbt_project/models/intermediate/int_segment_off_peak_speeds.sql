{{ config(unique_key='local_date') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- How many off-peak speed samples each segment had at each speed (integer km/h), per local day: the
-- histogram the free-flow percentile is read from. Incremental: the local days in which an off-peak
-- snapshot was merged are counted again from their buckets' speeds (other builds change nothing here).
{%- set spans = changed_spans('local_day', where=is_off_peak('measured_at')) %}

with off_peak_buckets as (
    -- Filtered here, before the unnest: a filter beside a lateral unnest is not pushed into the scan
    -- (DuckDB plans it above the unnest's join), which then read every bucket of the history.
    select segment_key, bucket_start, off_peak_speeds
    from {{ ref('int_segment_15min') }}
    where off_peak_speeds is not null
    {%- if spans is not none %}
        and {{ in_spans('bucket_start', spans) }}
    {%- endif %}
)

select
    segment_key,
    {{ local_date('bucket_start') }} as local_date,
    speed_kmh,
    cast(count(*) as integer) as sample_count
from off_peak_buckets, unnest(off_peak_speeds) as speeds(speed_kmh)
group by all
