{{ config(materialized='table') }}
-- The (merge stamp, snapshot time) pairs of the lake's rows that no successful build has absorbed yet
-- (macros/lake_changes.sql): what the lake gained since the marts last looked, whatever the snapshots'
-- times. Every incremental model rebuilds what these snapshots touch.
{%- set horizon = merge_horizon() %}

select
    o.merged_at,
    o.measured_at,
    any_value(o.measured_date) as measured_date,
    {{ local_date('o.measured_at') }} as local_date,
    any_value(o.source_key) as source_key,
    count(*) as row_count
from {{ ref('stg_lake__traffic_observations') }} as o
where not exists (
        select 1
        from {{ lake_state_relation() }} as a
        where a.merged_at = o.merged_at
        {%- if horizon %}
            and a.merged_at > {{ horizon }}
        {%- endif %}
    )
{%- if horizon %}
    and o.merged_at > {{ horizon }}
{%- endif %}
group by o.merged_at, o.measured_at
