-- The listings are newest first by id (UUIDv7: time first), as on
-- PostgreSQL (migrations/postgres/0009_listings_by_id.sql), so the primary
-- key holds them in order and the created_at indexes have no reader left.
DROP INDEX mandelboxes_created_at;
DROP INDEX sessions_created_at;
