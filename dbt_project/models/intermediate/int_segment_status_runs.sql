{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['segment_key', 'started_at'],
        on_schema_change='fail',
    )
}}
-- Runs of one measured status per segment: a run starts when the status differs from the previous
-- measured one and ends when the next run starts. 'unknown' samples (no probe) carry no information
-- and neither start nor end a run. A segment's first run has no from_status.
-- Incremental: the runs still open, plus the samples measured after the latest one held, are enough
-- to extend, close and open runs; the rows of the runs touched are replaced.
{%- set since = watermark('last_measured_at') %}

with new_samples as (
    select segment_key, measured_at, traffic_status as status
    from {{ ref('int_observations_enriched') }}
    where is_measured
    {%- if since %}
        and {{ measured_since(since, inclusive=false) }}
    {%- endif %}
),

samples as (
    select
        segment_key,
        measured_at,
        status,
        null::timestamptz as started_at,
        null::varchar as from_status
    from new_samples
    {%- if is_incremental() %}
    union all
    -- An open run stands for all its samples: placed at its last one, it keeps its start and origin.
    select segment_key, last_measured_at, to_status, started_at, from_status
    from {{ this }}
    where ended_at is null
        and segment_key in (select segment_key from new_samples)
    {%- endif %}
),

numbered as (
    select
        *,
        sum(case when status is distinct from previous_status then 1 else 0 end)
            over (partition by segment_key order by measured_at) as run_number
    from (
        select *, lag(status) over (partition by segment_key order by measured_at) as previous_status
        from samples
    )
),

runs as (
    select
        segment_key,
        run_number,
        any_value(status) as status,
        coalesce(min(started_at), min(measured_at)) as started_at,
        bool_or(started_at is not null) as was_open,
        max(from_status) as stored_from_status,
        max(measured_at) as last_measured_at
    from numbered
    group by segment_key, run_number
)

select
    segment_key,
    case
        when was_open then stored_from_status
        else lag(status) over (partition by segment_key order by run_number)
    end as from_status,
    status as to_status,
    started_at,
    lead(started_at) over (partition by segment_key order by run_number) as ended_at,
    last_measured_at
from runs
