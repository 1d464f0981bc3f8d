{{ config(materialized='table') }}
-- One row per segment and attribute version: what an observation was measured with. Several versions
-- may share one (A-B-A), with the same attributes. A table (one row per segment version, rebuilt each
-- build): the congestion_events view reads it when published, where the lake is not attached.
select
    segment_key,
    attributes_hash,
    any_value(road_name) as road_name,
    any_value(carriageway) as carriageway,
    any_value(hierarchy) as hierarchy,
    any_value(speed_limit_kmh) as speed_limit_kmh,
    any_value(length_m) as length_m
from {{ ref('int_segment_versions') }}
group by segment_key, attributes_hash
