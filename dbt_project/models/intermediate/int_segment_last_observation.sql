{{ config(unique_key='segment_key') }}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- The latest observation of every segment. Incremental: the rows of the snapshots merged since the last
-- build compete with the latest held for their segments; a late snapshot older than that loses.
{%- set spans = changed_spans('bucket') %}

with merged as (
    select segment_key, measured_at, traffic_status, speed_kmh, travel_time_s, reliability_pct, probe_count
    from {{ ref('stg_lake__traffic_observations') }}
    {%- if spans is not none %}
    where {{ lake_rows_in_spans(spans) }}
        and measured_at in (select measured_at from {{ ref('int_lake_changes') }})
    {%- endif %}
),

candidates as (
    select * from merged
    {%- if is_incremental() %}
    union all
    select segment_key, measured_at, traffic_status, speed_kmh, travel_time_s, reliability_pct, probe_count
    from {{ this }}
    where segment_key in (select segment_key from merged)
    {%- endif %}
)

select
    segment_key,
    max(measured_at) as measured_at,
    -- Aggregates rather than a window over all rows: a full refresh reads the whole history.
    arg_max(traffic_status, measured_at) as traffic_status,
    arg_max(speed_kmh, measured_at) as speed_kmh,
    arg_max(travel_time_s, measured_at) as travel_time_s,
    arg_max(reliability_pct, measured_at) as reliability_pct,
    arg_max(probe_count, measured_at) as probe_count
from candidates
group by segment_key
