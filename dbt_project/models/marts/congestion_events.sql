{{ config(materialized='view') }}
-- Congestion episodes: the congested spells of int_segment_spells, with how and when each ended. A view:
-- spells are kept incrementally, and an episode's end depends on the latest snapshot (ongoing or not).
{%- set gap = "interval '" ~ var('episode_gap_minutes') ~ " minutes'" %}

with latest_snapshot as (
    select max(measured_at) as measured_at from {{ ref('int_segment_last_observation') }}
),

episodes as (
    select
        s.*,
        coalesce(s.cleared_at, case when l.measured_at - s.last_at > {{ gap }} then s.last_at end) as ended_at,
        l.measured_at as latest_measured_at
    from {{ ref('int_segment_spells') }} as s
    cross join latest_snapshot as l
    where s.is_congested
)

select
    e.segment_key,
    a.road_name,
    a.carriageway,
    e.first_at as started_at,
    e.last_at as last_congested_at,
    e.ended_at,
    case when e.cleared_at is not null then 'cleared' when e.ended_at is not null then 'gap' end as end_reason,
    e.ended_at is null as is_ongoing,
    case when e.closed_count > 0 then 'impossible' else 'congested' end as worst_status,
    e.closed_count > 0 as is_closure,
    e.sample_count,
    e.closed_count as closed_sample_count,
    date_diff('second', e.first_at, coalesce(e.ended_at, e.latest_measured_at)) / 60.0 as duration_minutes
from episodes as e
left join {{ ref('int_segment_attributes') }} as a
    on e.segment_key = a.segment_key
    and e.attributes_hash = a.attributes_hash
