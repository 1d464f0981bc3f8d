"""The length of a road segment from its GeoJSON geometry text, in pure Python.

The lake measures road_segments with it (`trafficwatch.lake.segments`), and the local feed's simulator its
simulated segments, so that both agree to the metre; this module imports nothing else, so the feed does not
load polars or delta-rs for it.
"""

from __future__ import annotations

import itertools
import json
import math

EARTH_RADIUS_M = 6_371_008.8  # the mean radius (IUGG)


def _haversine_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(a))


def geometry_length_m(geojson: str | None) -> float | None:
    """Length along a LineString or every part of a MultiLineString, in metres."""
    if not geojson:
        return None
    geometry = json.loads(geojson)
    lines = geometry["coordinates"] if geometry.get("type") == "MultiLineString" else [geometry["coordinates"]]
    return sum(_haversine_m(*a[:2], *b[:2]) for line in lines for a, b in itertools.pairwise(line))
