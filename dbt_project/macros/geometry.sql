{#- A GeoJSON LineString or MultiLineString as one JSON array of [lon, lat] points, the path shape
    deck.gl draws: the parts of a MultiLineString are concatenated, any third coordinate dropped, and each
    coordinate rounded to 6 decimals (0.11 m of latitude, less of longitude). The source's 15 to 17
    significant digits (far below a millimetre) would nearly double what the maps send to each viewer. -#}
{% macro path_json(geojson) -%}
    to_json(list_transform(
        case json_extract_string({{ geojson }}, '$.type')
            when 'MultiLineString' then flatten(cast(json_extract({{ geojson }}, '$.coordinates') as double[][][]))
            else cast(json_extract({{ geojson }}, '$.coordinates') as double[][])
        end,
        point -> list_transform(point[1:2], coordinate -> round(coordinate, 6))
    ))::varchar
{%- endmacro %}


{#- The carriageway a segment id names: 'D' or 'G' for ids ending _D / _G (the two carriageways of a divided
    stretch), null for an undivided segment. -#}
{% macro carriageway(segment_key) -%}
    case right({{ segment_key }}, 2) when '_D' then 'D' when '_G' then 'G' end
{%- endmacro %}
