{#- One thinning of the paths in `points` (segment_key, part_no, point_no, lon, lat): each interior point at an
    even position of its part goes when it lies within `tolerance_m` metres of the straight piece between its
    two neighbours. Those neighbours always stay, so each point dropped is within `tolerance_m` of the path
    left: one pass moves a path by at most that, two passes by twice that. -#}
{% macro thinning_pass(points, tolerance_m) -%}
    select segment_key, part_no, point_no, lon, lat
    from (
        select
            *,
            row_number() over part_order as position,
            count(*) over (partition by segment_key, part_no) as part_points,
            lag(lon) over part_order as lon_before,
            lag(lat) over part_order as lat_before,
            lead(lon) over part_order as lon_after,
            lead(lat) over part_order as lat_after
        from {{ points }}
        window part_order as (partition by segment_key, part_no order by point_no)
    )
    where position % 2 = 1
        or position = part_points
        or not {{ near_piece('lon', 'lat', 'lon_before', 'lat_before', 'lon_after', 'lat_after', tolerance_m) }}
{%- endmacro %}


{#- Whether the point (x, y) lies within `tolerance_m` metres of the straight piece from (ax, ay) to (bx, by)
    ([lon, lat] in degrees) and projects onto it, not beyond an end; on a flat projection at the piece's start
    (error far below a metre over a segment). With P = p - a and B = b - a in metres: |B x P| <= tolerance |B|
    and 0 <= B . P <= |B|^2 (squared where needed, so no root or division). A piece of no length (the path
    goes out to the point and back) is never near: the point is where the path turns. -#}
{% macro near_piece(x, y, ax, ay, bx, by, tolerance_m) -%}
    {%- set metres_per_degree_lon = '(111320.0 * cos(radians(' ~ ay ~ ')))' -%}
    {%- set px = '((' ~ x ~ ' - ' ~ ax ~ ') * ' ~ metres_per_degree_lon ~ ')' -%}
    {%- set py = '((' ~ y ~ ' - ' ~ ay ~ ') * 110540.0)' -%}
    {%- set qx = '((' ~ bx ~ ' - ' ~ ax ~ ') * ' ~ metres_per_degree_lon ~ ')' -%}
    {%- set qy = '((' ~ by ~ ' - ' ~ ay ~ ') * 110540.0)' -%}
    (
        pow({{ qx }} * {{ py }} - {{ qy }} * {{ px }}, 2)
            <= {{ tolerance_m * tolerance_m }} * (pow({{ qx }}, 2) + pow({{ qy }}, 2))
        and {{ qx }} * {{ px }} + {{ qy }} * {{ py }} between 0 and pow({{ qx }}, 2) + pow({{ qy }}, 2)
        and pow({{ qx }}, 2) + pow({{ qy }}, 2) > 0
    )
{%- endmacro %}


{#- The carriageway a segment id names: 'D' or 'G' for ids ending _D / _G (the two carriageways of a divided
    stretch), null for an undivided segment. -#}
{% macro carriageway(segment_key) -%}
    case right({{ segment_key }}, 2) when '_D' then 'D' when '_G' then 'G' end
{%- endmacro %}
