{{
    config(
        unique_key=['segment_key', 'first_at'],
        post_hook="delete from {{ this }} where last_at is null",
    )
}}
-- depends_on: {{ ref('int_lake_changes') }}  (what changed_spans() reads)
-- Spells: per segment, maximal runs of consecutive measured samples of one class, congested
-- (congested or impossible) or not (freeFlow, heavy), with no gap longer than var('episode_gap_minutes')
-- between two of them. Unknown samples are no sample. A congested spell is a congestion episode
-- (congestion_events); a spell stores what its episode needs: its first and last sample, counts, and
-- `cleared_at`, the first measured sample after it when that one is not congested and within the gap.
--
-- Incremental, exact in any arrival order: the stored spells within the gap of a merged snapshot's time
-- are taken again as blocks (those holding such a time are rebuilt from their samples in the lake), the
-- merged snapshots' samples are added as one-sample blocks, and blocks are merged again the way the full
-- build merges samples. The first stored spell after them is context only (for `cleared_at`). The stored
-- spells taken are replaced: their keys come back as tombstones (last_at null) that the post-hook drops.
{%- set gap = "interval '" ~ var('episode_gap_minutes') ~ " minutes'" %}
{%- set spans = changed_spans('bucket') %}
{%- if spans is not none %}
    {#- Literal bounds on the stored spells that may be near a change: zone maps then skip the rest of
        the table (the join conditions alone scan it all). -#}
    {%- if spans | length == 0 %}
        {%- set near_changes = 'false' %}
    {%- else %}
        {%- set near_changes = 's.last_at >= ' ~ spans[0].start ~ ' - ' ~ gap ~ ' and s.first_at < '
            ~ spans[-1].end ~ ' + ' ~ gap %}
    {%- endif %}
    {%- set query -%}
        select
            strftime(min(s.first_at) at time zone 'UTC', '%Y-%m-%d %H:%M:%S.%f'),
            strftime((max(s.last_at) + interval 1 microsecond) at time zone 'UTC', '%Y-%m-%d %H:%M:%S.%f')
        from {{ this }} as s
        where {{ near_changes }} and exists (
            select 1 from {{ ref('int_lake_changes') }} as c where c.measured_at between s.first_at and s.last_at
        )
    {%- endset -%}
    {%- set bounds = run_query(query).rows[0] if execute else [none, none] -%}
    {%- set rebuilt_spans = [] if bounds[0] is none else
        [{'start': "timestamptz '" ~ bounds[0] ~ "+00'", 'end': "timestamptz '" ~ bounds[1] ~ "+00'"}] -%}
{%- endif %}

with
{%- if spans is none %}

samples as (
    select segment_key, is_congested, measured_at, traffic_status, is_closed, attributes_hash
    from {{ ref('int_observations_enriched') }}
    where traffic_status <> 'unknown'
),
{%- else %}

changes as (
    select distinct measured_at from {{ ref('int_lake_changes') }}
),

near as (
    select s.*, bool_or(c.measured_at between s.first_at and s.last_at) as holds_change
    from {{ this }} as s
    inner join changes as c
        on c.measured_at between s.first_at - {{ gap }} and s.last_at + {{ gap }}
    where {{ near_changes }}
    group by all
),

merged_samples as (
    select segment_key, is_congested, measured_at, traffic_status, is_closed, attributes_hash
    from {{ ref('int_observations_enriched') }}
    where {{ lake_rows_in_spans(spans) }}
        and measured_at in (select measured_at from changes)
        and traffic_status <> 'unknown'
),

rebuilt_samples as (
    select o.segment_key, o.is_congested, o.measured_at, o.traffic_status, o.is_closed, o.attributes_hash
    from {{ ref('int_observations_enriched') }} as o
    inner join near as n
        on n.holds_change
        and o.segment_key = n.segment_key
        and o.measured_at between n.first_at and n.last_at
    where {{ lake_rows_in_spans(rebuilt_spans) }}
        and o.traffic_status <> 'unknown'
),

samples as (
    select * from merged_samples
    union
    select * from rebuilt_samples
),
{%- endif %}

-- Each sample as a block of one sample, the unit the spells below are merged from.
sample_blocks as (
    select
        segment_key,
        is_congested,
        measured_at as first_at,
        measured_at as last_at,
        1 as sample_count,
        cast(traffic_status = 'congested' as integer) as congested_count,
        cast(is_closed as integer) as closed_count,
        attributes_hash,
        false as is_context
    from samples
),
{%- if spans is none %}

blocks as (
    select * from sample_blocks
),
{%- else %}

taken as (
    select * from sample_blocks
    union all
    select
        segment_key, is_congested, first_at, last_at, sample_count, congested_count, closed_count,
        attributes_hash, false
    from near
    where not holds_change
),

regions as (
    select segment_key, max(last_at) as region_end from taken group by segment_key
),

successors as (
    select
        s.segment_key,
        arg_min(s.is_congested, s.first_at) as is_congested,
        min(s.first_at) as first_at
    from {{ this }} as s
    inner join regions as r on s.segment_key = r.segment_key and s.first_at > r.region_end
    group by s.segment_key
),

blocks as (
    select * from taken
    union all
    select segment_key, is_congested, first_at, first_at, 0, 0, 0, null, true from successors
),
{%- endif %}

ordered as (
    select
        *,
        case
            when is_congested = lag(is_congested) over w and first_at - lag(last_at) over w <= {{ gap }} then 0
            else 1
        end as starts_spell
    from blocks
    window w as (partition by segment_key order by first_at)
),

numbered as (
    select
        *,
        sum(starts_spell) over (
            partition by segment_key order by first_at rows between unbounded preceding and current row
        ) as spell_number
    from ordered
),

spells as (
    select
        segment_key,
        spell_number,
        any_value(is_congested) as is_congested,
        min(first_at) as first_at,
        max(last_at) as last_at,
        cast(sum(sample_count) as integer) as sample_count,
        cast(sum(congested_count) as integer) as congested_count,
        cast(sum(closed_count) as integer) as closed_count,
        arg_min(attributes_hash, first_at) as attributes_hash,
        bool_or(is_context) as is_context
    from numbered
    group by segment_key, spell_number
),

linked as (
    select
        *,
        lead(first_at) over w as next_first_at,
        lead(is_congested) over w as next_is_congested
    from spells
    window w as (partition by segment_key order by first_at)
)

select
    segment_key,
    is_congested,
    first_at,
    last_at,
    sample_count,
    congested_count,
    closed_count,
    attributes_hash,
    case
        when is_congested and not next_is_congested and next_first_at - last_at <= {{ gap }} then next_first_at
    end as cleared_at
from linked
where not is_context
{%- if spans is not none %}

union all

-- Tombstones of the stored spells taken above (the post-hook deletes them after the delete+insert).
select segment_key, null, first_at, null, null, null, null, null, null
from near
{%- endif %}
