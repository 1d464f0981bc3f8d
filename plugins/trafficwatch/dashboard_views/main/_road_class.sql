-- A road's main road class: the most common `hierarchy` among its segments' latest states. Not a dataset:
-- the road views join it (a file whose name starts with "_" is created before the others).
SELECT road_name, mode(hierarchy) AS hierarchy FROM main.segment_latest GROUP BY road_name
