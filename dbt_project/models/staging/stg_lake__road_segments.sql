select
    segment_key,
    valid_from,
    valid_to,
    is_current,
    road_name,
    hierarchy,
    speed_limit_kmh,
    insee,
    geometry_type,
    geometry_geojson,
    length_m,
    attributes_hash
from {{ source('lake', 'road_segments') }}
