{#- The checks of the minute's guard (tests/guard_built_rows.sql), as one query: a row per check that
    failed, naming the model, the problem and how many rows have it.

    `checks`: one mapping per model, with
      model      the model's name;
      rows       which of its rows to look at (SQL; none: all of them);
      key        columns no two of those rows may share;
      not_null   columns none of those rows may leave null;
      accepted   {column: [values]}: the only values a column may hold.
    Each model's YAML declares the same rules as data tests over the whole table, run hourly (`audit`). -#}
{% macro guard_checks(checks) -%}
    {%- set queries = [] -%}
    {%- for check in checks -%}
        {#- Each model's rows are read once (a materialized CTE): a view such as congestion_events is
            evaluated once for all its checks. -#}
        {%- set problems = [] -%}
        {%- if check.get('key') -%}
            {%- do problems.append(
                "select 'duplicate " ~ check.key | join(', ') ~ "' as problem, cast(coalesce(sum(n), 0) as bigint) "
                ~ "as failing_rows from (select count(*) as n from checked group by " ~ check.key | join(', ')
                ~ " having count(*) > 1)"
            ) -%}
        {%- endif -%}
        {%- for column in check.get('not_null', []) -%}
            {%- do problems.append("select 'null " ~ column ~ "', count(*) from checked where " ~ column ~ " is null") -%}
        {%- endfor -%}
        {%- for column, values in check.get('accepted', {}).items() -%}
            {%- do problems.append(
                "select '" ~ column ~ " not in the accepted values', count(*) from checked where " ~ column
                ~ " not in (" ~ values | join(', ') ~ ")"
            ) -%}
        {%- endfor -%}
        {%- do queries.append(
            "(with checked as materialized (select * from " ~ ref(check.model) ~ " where "
            ~ (check.get('rows') or 'true') ~ ") select '" ~ check.model ~ "' as model, * from ("
            ~ problems | join(' union all ') ~ "))"
        ) -%}
    {%- endfor -%}
    select * from (
        {{ queries | join('\n        union all\n        ') }}
    )
    where failing_rows > 0
{%- endmacro %}
