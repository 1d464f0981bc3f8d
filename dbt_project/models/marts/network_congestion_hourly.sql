-- The network's congestion level per hour: the extra travel time over free flow of every segment with a
-- speed sample in the hour, length-weighted (sums of travel times, so long segments weigh their length).
-- Rebuilt each time from the hourly sums: the free-flow reference moves with history.
select
    h.hour_start,
    any_value(h.local_date) as local_date,
    any_value(h.day_of_week) as day_of_week,
    any_value(h.hour_of_day) as hour_of_day,
    cast(count(*) as integer) as measured_segments,
    sum(h.length_m) / 1000 as measured_km,
    sum(h.sum_travel_time_s / h.sample_count) as travel_time_s,
    sum(f.free_flow_travel_time_s) as free_flow_travel_time_s,
    sum(h.sum_travel_time_s / h.sample_count) / sum(f.free_flow_travel_time_s) - 1 as congestion_level
from {{ ref('int_segment_hourly') }} as h
inner join {{ ref('segment_free_flow') }} as f on h.segment_key = f.segment_key
where h.sample_count > 0
    and f.free_flow_travel_time_s > 0
group by h.hour_start
