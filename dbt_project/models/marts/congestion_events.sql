{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['segment_key', 'started_at'],
        on_schema_change='fail',
    )
}}
-- Every change of a segment's measured status, with how long the new status lasted. Incremental: a
-- build rewrites the events still ongoing and those that ended after the latest start it holds; older
-- events cannot change.
{%- set since = watermark('started_at') %}

with latest_snapshot as (
    select max(measured_at) as measured_at from {{ ref('int_segment_last_observation') }}
)

select
    r.segment_key,
    v.road_name,
    r.from_status,
    r.to_status,
    r.started_at,
    r.ended_at,
    -- Ongoing events last until the latest snapshot so far.
    date_diff('second', r.started_at, coalesce(r.ended_at, latest_snapshot.measured_at)) / 60.0 as duration_minutes
from {{ ref('int_segment_status_runs') }} as r
cross join latest_snapshot
inner join {{ ref('int_segment_versions') }} as v
    on r.segment_key = v.segment_key
    and r.started_at >= v.effective_from
    and r.started_at < v.effective_to
where r.from_status is not null
{%- if since %}
    and (r.ended_at is null or r.ended_at > {{ since }})
{%- endif %}
