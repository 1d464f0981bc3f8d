{#- Start of the fixed-length bucket holding `ts` (buckets aligned on the Unix epoch, so a 15-minute
    or hourly bucket starts on the quarter or the hour in every time zone with whole-hour offsets). -#}
{% macro bucket_start(ts, seconds) -%}
    to_timestamp(floor(epoch({{ ts }}) / {{ seconds }}) * {{ seconds }})
{%- endmacro %}

{#- Each of `columns` as it was at the latest `at` of the group: a segment's attributes over a bucket,
    when a new version of the segment starts within it. -#}
{% macro latest_values(columns, at) -%}
    {%- for column in columns %}
    arg_max({{ column }}, {{ at }}) as {{ column }}{{ ',' if not loop.last }}
    {%- endfor %}
{%- endmacro %}


{#- Day of week (1 = Monday .. 7 = Sunday) and hour of day on the local clock of var('local_timezone'). -#}
{% macro local_day_of_week(ts) -%}
    cast(isodow(timezone('{{ var("local_timezone") }}', {{ ts }})) as integer)
{%- endmacro %}

{% macro local_hour_of_day(ts) -%}
    cast(hour(timezone('{{ var("local_timezone") }}', {{ ts }})) as integer)
{%- endmacro %}

{#- The local date (a Rennes day starts at local midnight) of `ts`. -#}
{% macro local_date(ts) -%}
    cast(timezone('{{ var("local_timezone") }}', {{ ts }}) as date)
{%- endmacro %}


{#- Whether `ts` falls in one of var('off_peak_local_hours') on the local clock. -#}
{% macro is_off_peak(ts) -%}
    {{ local_hour_of_day(ts) }} in ({{ var('off_peak_local_hours') | join(', ') }})
{%- endmacro %}
