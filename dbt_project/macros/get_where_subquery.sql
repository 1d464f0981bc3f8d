{#- Data tests of models that grow with history look at recent rows only. Their `where` config may name
    the tested relation as __relation__, e.g.
        where: "bucket_start > (select max(bucket_start) from __relation__) - interval 1 day"
    Older rows were tested when they were built; this keeps a build's cost flat as history grows.
    Overrides dbt's macro of the same name (the documented extension point for `where`). -#}
{% macro get_where_subquery(relation) -%}
    {%- set where = config.get('where') -%}
    {%- if where -%}
        {%- set where = where | replace('__relation__', relation | string) -%}
        {%- set filtered -%}
            (select * from {{ relation }} where {{ where }}) dbt_subquery
        {%- endset -%}
        {%- do return(filtered) -%}
    {%- else -%}
        {%- do return(relation) -%}
    {%- endif -%}
{%- endmacro %}
