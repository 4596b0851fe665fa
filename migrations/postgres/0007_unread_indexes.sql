-- Two indexes no query reads, each written on every row version (no update
-- of a box or a session is HOT: their state is indexed). Found by
-- pg_stat_user_indexes after a loadgen run: zero scans, while each added an
-- entry per state change of every box or session.
--
-- * mandelboxes_live_by_region: claims find WAITING boxes through
--   mandelboxes_waiting (region, app) and count a host's boxes through
--   mandelboxes_live_by_host; nothing counts boxes per region.
-- * sessions_mandelbox: the live session on a box is found through the unique
--   sessions_one_per_mandelbox (the queries name its condition); no query looks
--   for finished sessions by box, and boxes are never deleted, so the foreign
--   key needs no index of its own.
DROP INDEX mandelboxes_live_by_region;
DROP INDEX sessions_mandelbox;
