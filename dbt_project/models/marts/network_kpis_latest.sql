{{ config(materialized='view') }}
-- One row: the network in its latest snapshot. Shares are of all segments in the network, so that
-- freeflow + heavy + congested (congested or impossible) + unknown = 1, where unknown also counts the
-- segments absent from the latest snapshot. Closures are counted apart: segments and km. A view: one row
-- over segment_latest's 2,859, computed when published, costs no node in a minute's build.
with latest as (
    select max(measured_at) as measured_at from {{ ref('segment_latest') }}
),

network as (
    select
        s.*,
        s.measured_at = latest.measured_at as in_latest_snapshot
    from {{ ref('segment_latest') }} as s
    cross join latest
),

counts as (
    select
        count(*) as segments_total,
        count(*) filter (where in_latest_snapshot and traffic_status = 'freeFlow') as freeflow,
        count(*) filter (where in_latest_snapshot and traffic_status = 'heavy') as heavy,
        count(*) filter (where in_latest_snapshot and traffic_status = 'congested') as congested,
        count(*) filter (where in_latest_snapshot and traffic_status = 'impossible') as impossible,
        coalesce(sum(length_m) filter (where in_latest_snapshot and traffic_status = 'impossible'), 0) / 1000
            as closed_km,
        -- The network's speed over its limits: time at the limits over actual time, length-weighted,
        -- over the segments with a speed sample (closures have no speed).
        sum(length_m / nullif(speed_limit_kmh, 0)) filter (where in_latest_snapshot and speed_ratio is not null)
            / nullif(sum(length_m / greatest(speed_kmh, 1)) filter (where in_latest_snapshot and speed_ratio is not null), 0)
            as mean_speed_ratio
    from network
)

select
    latest.measured_at,
    cast(freeflow + heavy + congested + impossible as integer) as segments_reporting,
    cast(segments_total as integer) as segments_total,
    freeflow / segments_total as share_freeflow,
    heavy / segments_total as share_heavy,
    (congested + impossible) / segments_total as share_congested,
    impossible / segments_total as share_impossible,
    (segments_total - freeflow - heavy - congested - impossible) / segments_total as share_unknown,
    cast(impossible as integer) as closed_segments,
    closed_km,
    mean_speed_ratio,
    date_diff('millisecond', latest.measured_at, now()) / 60000.0 as minutes_since_update
from counts
cross join latest
