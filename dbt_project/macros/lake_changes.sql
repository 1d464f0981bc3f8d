{#- What the lake merged since the marts last absorbed it, and the hooks that keep that state.

    Every observation carries `merged_at`, the stamp of the merge that wrote it (one stamp per merge commit).
    `int_lake_changes` holds the (stamp, snapshot time) pairs of the rows no successful build has absorbed
    yet: every incremental model rebuilds the buckets, hours, days or segments' spells their snapshots
    touch, from all the lake's rows there, whatever order they landed in (a late snapshot, a backfill
    adding rows to an old snapshot, an archive). Rebuilding is idempotent, so changes processed by a build
    that then failed are simply processed again.

    The absorbed pairs live in lake_merges_absorbed, a table of the warehouse that only these hooks
    write (one row per merged snapshot): `dbt build` inserts the rows of int_lake_changes when every model
    of the project was built and every data test passed (a partial `--select` absorbs nothing). The
    publish copies it into the serving file, where `trafficwatch lag` reads what the dashboards show.

    Stamps are compared one by one, not against a watermark: a merge stamps merged_at before it commits,
    so two merges racing (a backfill beside the minute merges) may commit out of stamp order. Rows are
    looked for from the newest absorbed stamp minus var('late_commit_margin_minutes') on: a merge commits
    within seconds of its stamp, far less than that margin. -#}
{% macro lake_state_relation() -%}
    {{- return(api.Relation.create(database=target.database, schema=target.schema, identifier='lake_merges_absorbed')) -}}
{%- endmacro %}


{#- The newest absorbed merge stamp minus the margin, as a literal (it prunes the lake scan by the row
    groups' merged_at statistics), or none when nothing was absorbed yet. -#}
{% macro merge_horizon() -%}
    {%- if not execute -%}{{ return(none) }}{%- endif -%}
    {%- set query -%}
        select strftime(
            (max(merged_at) - interval '{{ var("late_commit_margin_minutes") }} minutes') at time zone 'UTC',
            '%Y-%m-%d %H:%M:%S.%f'
        )
        from {{ lake_state_relation() }}
    {%- endset -%}
    {%- set horizon = run_query(query).columns[0].values()[0] -%}
    {{- return(none if horizon is none else "timestamptz '" ~ horizon ~ "+00'") -}}
{%- endmacro %}


{% macro create_lake_state() -%}
    {#- on-run-start: the state table exists; a full refresh starts from an empty one (all is rebuilt). -#}
    create schema if not exists {{ target.schema }};
    create table if not exists {{ lake_state_relation() }} (
        merged_at timestamptz not null,
        measured_at timestamptz not null,
        source_key varchar,
        row_count bigint not null,
        absorbed_at timestamptz not null
    );
    {%- if flags.FULL_REFRESH %}
    delete from {{ lake_state_relation() }};
    {%- endif %}
{%- endmacro %}


{% macro absorb_lake_changes(results) -%}
    {#- on-run-end: record int_lake_changes as absorbed when the whole project built and tested clean. -#}
    {%- if not execute -%}{{ return('') }}{%- endif -%}
    {%- set ok = ['success', 'pass', 'warn'] -%}
    {%- set done = [] -%}
    {%- for result in results -%}
        {%- if result.status | string not in ok -%}{{ return('') }}{%- endif -%}
        {%- if result.node.resource_type == 'model' -%}{%- do done.append(result.node.unique_id) -%}{%- endif -%}
    {%- endfor -%}
    {%- for node in graph.nodes.values() -%}
        {%- if node.resource_type == 'model' and node.package_name == project_name and node.unique_id not in done
              and node.config.materialized != 'view' -%}
            {{ return('') }}
        {%- endif -%}
    {%- endfor -%}
    {#- By name: a hook cannot ref() a model. -#}
    {%- set changes = api.Relation.create(database=target.database, schema=target.schema, identifier='int_lake_changes') -%}
    insert into {{ lake_state_relation() }}
    select merged_at, measured_at, source_key, row_count, now() from {{ changes }};
{%- endmacro %}


{#- The spans of time (UTC, [start, end)) the changes of this build touch, at the given grain: 'bucket'
    (15 minutes), 'hour', 'local_day' (a Rennes day), or 'snapshot' (the snapshot instants themselves, as
    one-microsecond spans), of the changes matching `where` (SQL on int_lake_changes) if given. Contiguous
    spans are joined, so a late day is one span, not 96 buckets. Returns a list of {start, end} literals,
    or none when the model is built whole (not incremental). -#}
{% macro changed_spans(grain, where=none) -%}
    {%- if not execute or not is_incremental() -%}{{ return(none) }}{%- endif -%}
    {%- set starts = {
        'snapshot': 'measured_at',
        'bucket': bucket_start('measured_at', 900),
        'hour': bucket_start('measured_at', 3600),
        'local_day': "timezone('" ~ var('local_timezone') ~ "', cast(local_date as timestamp))",
    } -%}
    {%- set lengths = {'snapshot': "interval 1 microsecond", 'bucket': "interval 15 minute",
                       'hour': "interval 1 hour", 'local_day': "interval 1 day"} -%}
    {%- set query -%}
        with starts as (
            select distinct {{ starts[grain] }} as span_start
            from {{ ref('int_lake_changes') }}
            {%- if where %}
            where {{ where }}
            {%- endif %}
        ),
        spans as (
            select
                span_start,
                {%- if grain == 'local_day' %}
                timezone('{{ var("local_timezone") }}', timezone('{{ var("local_timezone") }}', span_start) + {{ lengths[grain] }}) as span_end
                {%- else %}
                span_start + {{ lengths[grain] }} as span_end
                {%- endif %}
            from starts
        ),
        islands as (
            select *, sum(case when span_start <= previous_end then 0 else 1 end) over (order by span_start) as island
            from (select *, lag(span_end) over (order by span_start) as previous_end from spans)
        )
        select
            strftime(min(span_start) at time zone 'UTC', '%Y-%m-%d %H:%M:%S.%f'),
            strftime(max(span_end) at time zone 'UTC', '%Y-%m-%d %H:%M:%S.%f')
        from islands
        group by island
        order by 1
    {%- endset -%}
    {%- set spans = [] -%}
    {%- for row in run_query(query).rows -%}
        {%- do spans.append({'start': "timestamptz '" ~ row[0] ~ "+00'", 'end': "timestamptz '" ~ row[1] ~ "+00'"}) -%}
    {%- endfor -%}
    {{- return(spans) -}}
{%- endmacro %}


{#- A predicate keeping the rows whose `column` falls in one of the spans; `false` when there are none. -#}
{% macro in_spans(column, spans) -%}
    {%- if spans | length == 0 -%}
        false
    {%- else -%}
        ({% for span in spans %}{{ column }} >= {{ span.start }} and {{ column }} < {{ span.end }}{{ ' or ' if not loop.last }}{% endfor %})
    {%- endif -%}
{%- endmacro %}


{#- The same for lake rows, with the UTC dates the spans cover as literals too: those prune the
    `measured_date` partitions of the delta scan (its only pruning: the delta extension skips files by
    partition values, not by column statistics). -#}
{% macro lake_rows_in_spans(spans) -%}
    {%- if spans | length == 0 -%}
        false
    {%- else -%}
        {%- set dates = [] -%}
        {%- set query -%}
            select distinct strftime(d, '%Y-%m-%d') from (
                {%- for span in spans %}
                select unnest(generate_series(
                    cast({{ span.start }} at time zone 'UTC' as date),
                    cast(({{ span.end }} - interval 1 microsecond) at time zone 'UTC' as date),
                    interval 1 day)) as d
                {{ 'union all' if not loop.last }}
                {%- endfor %}
            ) order by 1
        {%- endset -%}
        {%- for row in run_query(query).rows -%}{%- do dates.append("date '" ~ row[0] ~ "'") -%}{%- endfor -%}
        measured_date in ({{ dates | join(', ') }}) and {{ in_spans('measured_at', spans) }}
    {%- endif -%}
{%- endmacro %}
