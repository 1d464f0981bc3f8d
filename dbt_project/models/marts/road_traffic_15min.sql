{{ config(materialized='view') }}
-- Each road direction per 15-minute bucket beside its typical values for that hour of the week. A view over the
-- incremental int_road_15min: the typical values come from the all-history profile, which moves with
-- every build, so they are joined when read rather than frozen into old rows.
{{ road_buckets_beside_typical('int_road_15min', 'bucket_start') }}
