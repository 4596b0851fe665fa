-- Two indexes no query reads, each rewritten by every insert and (for the
-- first) every state change of a box. Checked with EXPLAIN QUERY PLAN of the
-- hot statements (see migrations/postgres/0007_unread_indexes.sql, where
-- pg_stat_user_indexes counted zero scans of the same indexes):
--
-- * mandelboxes_region_state: the claim finds WAITING boxes through
--   mandelboxes_waiting and counts a host's boxes through
--   mandelboxes_host_state; nothing counts boxes per region.
-- * sessions_mandelbox: the live session on a box is found through the unique
--   sessions_one_per_mandelbox (the query repeats its condition); no query
--   looks for finished sessions by box, and boxes are never deleted.
DROP INDEX mandelboxes_region_state;
DROP INDEX sessions_mandelbox;
