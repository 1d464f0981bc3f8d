{#- Aggregates of one road over one time bucket, from per-segment sums over that bucket (columns
    length_m, observation_count, sample_count, congested_count, sum_hours_per_km, min_speed_kmh,
    max_speed_kmh, sum_travel_time_s, unmeasured_travel_time_s, sum_reliability_pct).

    How a traffic engineer averages (documented in the road models' YAML):
    - speed: space-mean speed, the road's measured length over the time to drive it, where each segment
      takes its own time-mean travel time per km: sum(L) / sum(L * mean(1 / v)); a length-weighted
      harmonic mean, consistent with the travel time;
    - travel time: the sum of the segments' mean travel times; a segment without a probe in the bucket
      counts with the time upstream publishes for it (at about the speed limit), so that the road's
      time does not drop when segments stop reporting;
    - reliability and congested share: length-weighted over the measured segments. -#}
{% macro road_aggregates() -%}
    cast(count(*) as integer) as segment_count,
    sum(measured_length_m) / nullif(sum(measured_length_m * mean_hours_per_km), 0) as mean_speed_kmh,
    min(min_speed_kmh) as min_speed_kmh,
    max(max_speed_kmh) as max_speed_kmh,
    sum(segment_travel_time_s) as travel_time_s,
    sum(measured_length_m * mean_reliability_pct) / nullif(sum(measured_length_m), 0) as mean_reliability_pct,
    cast(sum(sample_count) as integer) as sample_count,
    sum(measured_length_m * congested_share) / nullif(sum(measured_length_m), 0) as congested_share
{%- endmacro %}


{#- Per-segment columns that road_aggregates() needs, derived from the sums. -#}
{% macro segment_means() -%}
    case when sample_count > 0 then length_m end as measured_length_m,
    sum_hours_per_km / nullif(sample_count, 0) as mean_hours_per_km,
    sum_reliability_pct / nullif(sample_count, 0) as mean_reliability_pct,
    congested_count / nullif(sample_count, 0) as congested_share,
    coalesce(
        sum_travel_time_s / nullif(sample_count, 0),
        unmeasured_travel_time_s / nullif(observation_count - sample_count, 0)
    ) as segment_travel_time_s
{%- endmacro %}
