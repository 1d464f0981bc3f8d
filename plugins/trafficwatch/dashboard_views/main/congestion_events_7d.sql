-- Congestion episodes (docs/traffic-measures.md: congested or impossible minutes, a gap over 15 minutes ends
-- one) that started in the 7 days before the latest one, in Rennes local time, with the class of their
-- segment's road. An episode with an impossible minute is a closure.
SELECT
    e.segment_key,
    e.road_name,
    e.carriageway,
    s.hierarchy,
    timezone('Europe/Paris', e.started_at) AS started_local,
    timezone('Europe/Paris', e.ended_at) AS ended_local,
    e.is_ongoing AS ongoing,
    e.end_reason,
    e.worst_status,
    e.is_closure,
    e.closed_sample_count,
    e.duration_minutes
FROM main.congestion_events AS e
LEFT JOIN main.segment_latest AS s USING (segment_key)
WHERE e.started_at > (SELECT max(started_at) FROM main.congestion_events) - INTERVAL 7 DAY
