-- Each segment version with the time span it applies to, for point-in-time joins. A segment's first
-- version also covers anything measured before it opened (history merged after an attribute change).
select
    segment_key,
    valid_from,
    valid_to,
    is_current,
    -- Upstream leaves a few names empty; a road needs a name to be grouped and shown.
    coalesce(nullif(trim(road_name), ''), '(unnamed road)') as road_name,
    hierarchy,
    speed_limit_kmh,
    insee,
    geometry_geojson,
    length_m,
    case
        when valid_from = min(valid_from) over (partition by segment_key) then '-infinity'::timestamptz
        else valid_from
    end as effective_from,
    coalesce(valid_to, 'infinity'::timestamptz) as effective_to
from {{ ref('stg_lake__road_segments') }}
