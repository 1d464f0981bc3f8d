{{ config(materialized='view') }}
-- Each segment version, with what every mart needs to group and weigh it: the road (a name is needed to
-- group), the carriageway from the segment's id, the length.
select
    segment_key,
    valid_from,
    valid_to,
    is_current,
    attributes_hash,
    -- Upstream leaves a few names empty; a road needs a name to be grouped and shown.
    coalesce(nullif(trim(road_name), ''), '(unnamed road)') as road_name,
    {{ carriageway('segment_key') }} as carriageway,
    hierarchy,
    speed_limit_kmh,
    insee,
    geometry_geojson,
    length_m
from {{ ref('stg_lake__road_segments') }}
