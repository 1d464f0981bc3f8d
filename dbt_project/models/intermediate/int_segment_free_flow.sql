{{ config(unique_key='segment_key') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- The percentile var('free_flow_percentile') of each segment's off-peak speed samples over all history,
-- read exactly from the histogram. Recomputed for every segment when off-peak snapshots were merged (a
-- scan of the histogram: one row per segment, day and distinct speed); unchanged otherwise.
{%- set spans = changed_spans('local_day', where=is_off_peak('measured_at')) %}

with counts as (
    select segment_key, speed_kmh, sum(sample_count) as sample_count
    from {{ ref('int_segment_off_peak_speeds') }}
    {%- if spans is not none and spans | length == 0 %}
    where false
    {%- endif %}
    group by segment_key, speed_kmh
),

cumulative as (
    select
        *,
        sum(sample_count) over (partition by segment_key order by speed_kmh) as at_or_below,
        sum(sample_count) over (partition by segment_key) as total
    from counts
)

-- The smallest speed that at least the percentile of the samples do not exceed (integer arithmetic).
select
    segment_key,
    min(speed_kmh) filter (where at_or_below * 100 >= {{ var('free_flow_percentile') }} * 100 * total) as off_peak_speed_kmh,
    cast(any_value(total) as integer) as off_peak_sample_count
from cumulative
group by segment_key
