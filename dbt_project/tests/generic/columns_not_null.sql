{#- None of `columns` is null: the not_null checks of one model in one query (a data test costs a query
    and dbt's own overhead per node, at every build). -#}
{% test columns_not_null(model, columns) %}
select *
from {{ model }}
where {% for column in columns %}{{ column }} is null{{ ' or ' if not loop.last }}{% endfor %}
{% endtest %}
