{#- The minute's guard: one data test over the rows a build wrote, in one query. Each failing check is a
    row (model, problem, failing_rows), and the build's error names them.

    A minute's build runs this test only: the models' YAML data tests (the same rules, over whole tables)
    cost dbt ~0.2 s of Python each, 36 of them a quarter of a build, so they run every hour instead
    (`trafficwatch audit`, DAG `marts_audit`). Large incremental models are checked where this build
    rebuilt them (the buckets, hours and local days of the snapshots it absorbed, int_lake_changes); small
    ones whole. A failure publishes nothing: the dashboards keep the previous serving file. The failing
    checks are stored (store_failures) for that error message to read: they cannot be queried again
    without the lake attached. -#}
{{ config(store_failures=true) }}
{%- set changes = ref('int_lake_changes') -%}
{%- set buckets = "bucket_start in (select " ~ bucket_start('measured_at', 900) ~ " from " ~ changes ~ ")" -%}
{%- set hours = "hour_start in (select " ~ bucket_start('measured_at', 3600) ~ " from " ~ changes ~ ")" -%}
{%- set days = "local_date in (select local_date from " ~ changes ~ ")" -%}
{%- set hours_of_week = "(day_of_week, hour_of_day) in (select " ~ local_day_of_week('measured_at') ~ ", "
    ~ local_hour_of_day('measured_at') ~ " from " ~ changes ~ ")" -%}
{%- set statuses = ["'freeFlow'", "'heavy'", "'congested'", "'impossible'", "'unknown'"] -%}
{{ guard_checks([
    {'model': 'int_lake_changes', 'key': ['merged_at', 'measured_at']},
    {'model': 'int_segment_attributes', 'key': ['segment_key', 'attributes_hash']},
    {'model': 'int_segment_versions', 'key': ['segment_key', 'valid_from']},
    {'model': 'int_segment_15min', 'rows': buckets, 'key': ['segment_key', 'bucket_start'], 'not_null': ['road_name']},
    {'model': 'int_segment_hourly', 'rows': hours, 'key': ['segment_key', 'hour_start']},
    {'model': 'int_segment_hour_of_week', 'rows': hours_of_week, 'key': ['segment_key', 'day_of_week', 'hour_of_day']},
    {'model': 'int_segment_off_peak_speeds', 'rows': days, 'key': ['segment_key', 'local_date', 'speed_kmh']},
    {'model': 'int_segment_free_flow', 'key': ['segment_key']},
    {'model': 'int_segment_last_observation', 'key': ['segment_key']},
    {'model': 'int_segment_spells',
     'rows': "last_at is null or last_at > (select max(last_at) from " ~ ref('int_segment_spells') ~ ") - interval 1 day",
     'key': ['segment_key', 'first_at'], 'not_null': ['is_congested', 'last_at']},
    {'model': 'int_road_15min', 'rows': buckets, 'key': ['road_name', 'direction', 'bucket_start']},
    {'model': 'int_road_hourly', 'rows': hours, 'key': ['road_name', 'direction', 'hour_start']},
    {'model': 'int_road_daily', 'rows': days, 'key': ['road_name', 'direction', 'local_date']},
    {'model': 'segment_latest', 'key': ['segment_key'],
     'not_null': ['segment_key', 'traffic_status', 'speed_kmh', 'is_closed'], 'accepted': {'traffic_status': statuses}},
    {'model': 'network_kpis_latest', 'not_null': ['measured_at', 'segments_total', 'closed_segments']},
    {'model': 'segment_free_flow', 'key': ['segment_key'], 'not_null': ['free_flow_speed_kmh']},
    {'model': 'road_hour_of_week_profile', 'key': ['road_name', 'direction', 'day_of_week', 'hour_of_day'],
     'accepted': {'direction': ["'D'", "'G'", "'both'"], 'day_of_week': [1, 2, 3, 4, 5, 6, 7]}},
    {'model': 'network_congestion_hourly', 'key': ['hour_start'], 'not_null': ['hour_start', 'congestion_level']},
    {'model': 'road_reliability_daily', 'rows': days, 'key': ['road_name', 'direction', 'local_date'],
     'not_null': ['travel_time_index']},
    {'model': 'segment_traffic_15min', 'rows': buckets, 'not_null': ['congested_share']},
    {'model': 'road_traffic_15min', 'rows': buckets, 'not_null': ['direction', 'travel_time_s']},
    {'model': 'road_traffic_hourly', 'rows': hours, 'not_null': ['direction', 'travel_time_s']},
    {'model': 'congestion_events',
     'rows': "ended_at is null or ended_at > (select max(last_congested_at) from " ~ ref('congestion_events') ~ ") - interval 1 day",
     'key': ['segment_key', 'started_at'], 'not_null': ['road_name', 'is_ongoing', 'duration_minutes'],
     'accepted': {'end_reason': ["'cleared'", "'gap'"]}},
    {'model': 'congestion_events', 'rows': 'is_ongoing', 'key': ['segment_key']},
]) }}
