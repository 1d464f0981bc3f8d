{#- Per-segment figures over one time bucket, from the segment's sums over it (columns length_m,
    speed_limit_kmh, sample_count, congested_count, closed_count, sum_hours_per_km, sum_travel_time_s,
    sum_reliability_pct), as road_aggregates() needs them.
    - a segment's travel time is the mean of its speed samples' travel times; without a speed sample in
      the bucket (unknown or closed throughout) it counts at its speed limit, length / limit, so that the
      road's time neither drops nor jumps when segments stop reporting (`measured_length_share` says how
      much of the road was measured);
    - shares of congestion and closure are over the samples with a status (speed samples and closures),
      time-weighted: `bucket_minutes` x share is the time. -#}
{% macro segment_means(bucket_minutes) -%}
    case when sample_count > 0 then length_m end as measured_length_m,
    case when sample_count + closed_count > 0 then length_m end as status_length_m,
    sum_hours_per_km / nullif(sample_count, 0) as mean_hours_per_km,
    sum_reliability_pct / nullif(sample_count, 0) as mean_reliability_pct,
    (congested_count + closed_count) / nullif(sample_count + closed_count, 0) as congested_share,
    closed_count / nullif(sample_count + closed_count, 0) as closed_share,
    {{ bucket_minutes }} * closed_count / nullif(sample_count + closed_count, 0) as closed_minutes,
    coalesce(
        sum_travel_time_s / nullif(sample_count, 0),
        length_m / nullif(speed_limit_kmh, 0) * 3.6
    ) as segment_travel_time_s
{%- endmacro %}


{#- Aggregates of one road direction over one time bucket, from segment_means() rows.
    How a traffic engineer averages (docs/traffic-measures.md; written out in road_traffic_15min.yml):
    - speed: space-mean speed over the segments with a speed sample, their length over the time to drive
      them, each taking its own harmonic-mean time per km: sum(L) / sum(L * mean(1 / v));
    - travel time: the sum of the segments' travel times along ONE direction (see road_directions());
    - reliability, congested and closed shares: length-weighted over the segments measured. -#}
{% macro road_aggregates() -%}
    cast(count(*) as integer) as segment_count,
    sum(length_m) as length_m,
    sum(measured_length_m) / nullif(sum(measured_length_m * mean_hours_per_km), 0) as mean_speed_kmh,
    min(min_speed_kmh) as min_speed_kmh,
    max(max_speed_kmh) as max_speed_kmh,
    sum(segment_travel_time_s) as travel_time_s,
    coalesce(sum(measured_length_m), 0) / nullif(sum(length_m), 0) as measured_length_share,
    sum(measured_length_m * mean_reliability_pct) / nullif(sum(measured_length_m), 0) as mean_reliability_pct,
    cast(sum(sample_count) as integer) as sample_count,
    cast(sum(closed_count) as integer) as closed_sample_count,
    sum(status_length_m * congested_share) / nullif(sum(status_length_m), 0) as congested_share,
    sum(status_length_m * closed_share) / nullif(sum(status_length_m), 0) as closed_share,
    coalesce(sum(closed_minutes), 0) as closed_segment_minutes,
    -- The sums behind the means, for aggregating further (hours to days, several roads) without averaging
    -- averages: speed = measured_km / measured_hours, congested share = congested_km / status_km.
    coalesce(sum(measured_length_m), 0) / 1000 as measured_km,
    coalesce(sum(measured_length_m * mean_hours_per_km), 0) / 1000 as measured_hours,
    coalesce(sum(status_length_m), 0) / 1000 as status_km,
    coalesce(sum(status_length_m * congested_share), 0) / 1000 as congested_km,
    coalesce(sum(status_length_m * closed_share), 0) / 1000 as closed_km
{%- endmacro %}


{#- The rows of `relation` (one per segment, with road_name and carriageway) assigned to road
    directions, within each group of `group_by` (e.g. a bucket):
    - a road with divided carriageways (some segment ids end _D / _G) is reported per direction, 'D' and
      'G': each direction is its own carriageway's segments plus the road's undivided segments, which are
      driven either way (31 roads of 156 mix both in the 2024 sample);
    - a road without any is one direction, 'both': its segments carry both directions.
    So a direction's travel time is one trip, never both carriageways added up. -#}
{% macro road_directions(relation, group_by=[]) -%}
    {%- set keys = ['road_name'] + group_by -%}
    select
        s.*,
        unnest(
            case
                when s.carriageway is not null then [s.carriageway]
                when r.is_divided then ['D', 'G']
                else ['both']
            end
        ) as direction
    from {{ relation }} as s
    inner join (
        select {{ keys | join(', ') }}, bool_or(carriageway is not null) as is_divided
        from {{ relation }}
        group by {{ keys | join(', ') }}
    ) as r
        using ({{ keys | join(', ') }})
{%- endmacro %}


{#- The rows of int_road_15min and int_road_hourly: each road direction per time bucket, aggregated from
    its segments' sums over that bucket. `segments_model` holds one row per segment and bucket, its
    bucket's start in `bucket_column`, buckets of `bucket_minutes`; `spans` (changed_spans()) limits the
    buckets read to those an incremental build rebuilds (none: all of them). -#}
{% macro road_buckets(segments_model, bucket_column, bucket_minutes, spans) -%}
with segments as (
    select
        road_name,
        carriageway,
        {{ bucket_column }},
        length_m,
        min_speed_kmh,
        max_speed_kmh,
        sample_count,
        closed_count,
        {{ segment_means(bucket_minutes) }}
    from {{ ref(segments_model) }}
    {%- if spans is not none %}
    where {{ in_spans(bucket_column, spans) }}
    {%- endif %}
),

directions as (
    {{ road_directions('segments', [bucket_column]) }}
)

select
    road_name,
    direction,
    {{ bucket_column }},
    -- Stored once per row, so that joining the typical week when the mart is read costs no time zone work.
    {{ local_date(bucket_column) }} as local_date,
    {{ local_day_of_week(bucket_column) }} as day_of_week,
    {{ local_hour_of_day(bucket_column) }} as hour_of_day,
    {{ road_aggregates() }}
from directions
group by road_name, direction, {{ bucket_column }}
{%- endmacro %}


{#- The rows of the marts road_traffic_15min and road_traffic_hourly: each road direction per bucket of
    `roads_model` (int_road_15min or int_road_hourly, its bucket's start in `bucket_column`) beside its
    typical values for that hour of the week (road_hour_of_week_profile). -#}
{% macro road_buckets_beside_typical(roads_model, bucket_column) -%}
select
    r.road_name,
    r.direction,
    r.{{ bucket_column }},
    r.day_of_week,
    r.hour_of_day,
    r.segment_count,
    r.length_m,
    r.mean_speed_kmh,
    r.min_speed_kmh,
    r.max_speed_kmh,
    r.travel_time_s,
    r.measured_length_share,
    r.mean_reliability_pct,
    r.sample_count,
    r.closed_sample_count,
    r.congested_share,
    r.closed_share,
    r.closed_segment_minutes,
    r.measured_km,
    r.measured_hours,
    r.status_km,
    r.congested_km,
    r.closed_km,
    p.typical_speed_kmh,
    p.typical_travel_time_s,
    p.measured_km as typical_measured_km,
    p.measured_hours as typical_measured_hours
from {{ ref(roads_model) }} as r
left join {{ ref('road_hour_of_week_profile') }} as p
    on r.road_name = p.road_name
    and r.direction = p.direction
    and r.day_of_week = p.day_of_week
    and r.hour_of_day = p.hour_of_day
{%- endmacro %}
