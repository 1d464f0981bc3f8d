{#- Start of the fixed-length bucket holding `ts` (buckets aligned on the Unix epoch, so a 15-minute
    or hourly bucket starts on the quarter or the hour in every time zone with whole-hour offsets). -#}
{% macro bucket_start(ts, seconds) -%}
    to_timestamp(floor(epoch({{ ts }}) / {{ seconds }}) * {{ seconds }})
{%- endmacro %}


{#- Day of week (1 = Monday .. 7 = Sunday) and hour of day on the local clock of var('local_timezone'). -#}
{% macro local_day_of_week(ts) -%}
    cast(isodow(timezone('{{ var("local_timezone") }}', {{ ts }})) as integer)
{%- endmacro %}

{% macro local_hour_of_day(ts) -%}
    cast(hour(timezone('{{ var("local_timezone") }}', {{ ts }})) as integer)
{%- endmacro %}
