{#- The latest value of `column` in the incremental model being built, as a timestamptz literal, or
    none on a first or full-refresh build. Rendered as a literal (not a subquery) so that the filter
    it feeds reaches the delta scan as a constant and prunes partitions and files. -#}
{% macro watermark(column) -%}
    {%- if execute and is_incremental() -%}
        {%- set query -%}
            select strftime(max({{ column }}) at time zone 'UTC', '%Y-%m-%d %H:%M:%S.%f') from {{ this }}
        {%- endset -%}
        {%- set latest = run_query(query).columns[0].values()[0] -%}
        {%- if latest is not none -%}
            {{- return("timestamptz '" ~ latest ~ "+00'") -}}
        {%- endif -%}
    {%- endif -%}
    {{- return(none) -}}
{%- endmacro %}


{#- Lake rows measured at or after `since` (strictly after when not `inclusive`). The measured_date
    bound is redundant with measured_at but is what prunes the partitions. -#}
{% macro measured_since(since, inclusive=true) -%}
    measured_date >= cast({{ since }} at time zone 'UTC' as date)
    and measured_at {{ '>=' if inclusive else '>' }} {{ since }}
{%- endmacro %}
