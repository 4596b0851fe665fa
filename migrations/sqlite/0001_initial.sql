-- Switchboard schema, SQLite flavour: the same tables, columns and constraints
-- as ../postgres/0001_initial.sql, with these representations:
--   * timestamps are INTEGER microseconds since the Unix epoch (UTC), so that
--     comparisons and ORDER BY in SQL are numeric and exact;
--   * UUIDs are TEXT in hyphenated lower-case form;
--   * booleans are INTEGER 0/1; JSON is TEXT.
-- Tables are STRICT so that a value bound with the wrong type is an error
-- instead of being silently stored in another form.

CREATE TABLE regions (
    name        TEXT PRIMARY KEY,
    enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    -- Image a host must run to receive sessions here; '' means any.
    image       TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    updated_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
) STRICT;

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    email       TEXT,
    created_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
) STRICT;

CREATE TABLE hosts (
    id                 TEXT PRIMARY KEY,
    region             TEXT NOT NULL,
    state              TEXT NOT NULL
        CHECK (state IN ('ACTIVE', 'DRAINING', 'DISCONNECTED', 'UNHEALTHY')),
    -- Set by a drain and kept while the host is disconnected, so that a host
    -- that reconnects resumes draining instead of taking sessions again.
    draining           INTEGER NOT NULL DEFAULT 0 CHECK (draining IN (0, 1)),
    image              TEXT NOT NULL,
    agent_version      TEXT NOT NULL,
    address            TEXT NOT NULL,
    capacity           INTEGER NOT NULL CHECK (capacity >= 0),
    generation         INTEGER NOT NULL CHECK (generation >= 0),
    last_heartbeat_at  INTEGER,
    disconnected_at    INTEGER,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
) STRICT;

CREATE INDEX hosts_region_state ON hosts (region, state);
CREATE INDEX hosts_state_disconnected_at ON hosts (state, disconnected_at);

CREATE TABLE mandelboxes (
    id          TEXT PRIMARY KEY,
    host_id     TEXT NOT NULL REFERENCES hosts (id),
    region      TEXT NOT NULL,
    app         TEXT NOT NULL,
    state       TEXT NOT NULL
        CHECK (state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING', 'DEAD', 'LOST')),
    -- The session the box was claimed or reserved for (kept as history once
    -- the box is finished).
    session_id  TEXT,
    -- SHA-256 of the disconnect token; the token itself is never stored.
    token_hash  TEXT NOT NULL,
    ports       TEXT NOT NULL DEFAULT '[]' CHECK (json_type(ports) = 'array'),
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CHECK (state NOT IN ('ALLOCATED', 'RUNNING') OR session_id IS NOT NULL)
) STRICT;

-- Claims: WAITING boxes of a region.
CREATE INDEX mandelboxes_region_state ON mandelboxes (region, state);
-- Capacity and bin-packing: live boxes of a host.
CREATE INDEX mandelboxes_host_state ON mandelboxes (host_id, state);
-- Sweep of spawns that never completed.
CREATE INDEX mandelboxes_state_updated_at ON mandelboxes (state, updated_at);
CREATE INDEX mandelboxes_created_at ON mandelboxes (created_at);

CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL REFERENCES users (id),
    state              TEXT NOT NULL
        CHECK (state IN ('PENDING', 'ASSIGNING', 'RUNNING', 'ENDED')),
    app                TEXT NOT NULL,
    client_version     TEXT NOT NULL,
    -- Regions the client asked for, best first: a JSON array of names.
    requested_regions  TEXT NOT NULL CHECK (json_type(requested_regions) = 'array'),
    region             TEXT,
    mandelbox_id       TEXT REFERENCES mandelboxes (id),
    host_id            TEXT,
    end_reason         TEXT CHECK (end_reason IN (
        'USER_ENDED', 'CLIENT_DISCONNECTED', 'MANDELBOX_EXITED', 'HOST_LOST',
        'NO_CAPACITY', 'ASSIGN_FAILED', 'HOST_DRAINED')),
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    ended_at           INTEGER,
    CHECK ((state = 'ENDED') = (end_reason IS NOT NULL)),
    CHECK ((state = 'ENDED') = (ended_at IS NOT NULL)),
    CHECK (state <> 'PENDING' OR mandelbox_id IS NULL),
    CHECK (state NOT IN ('ASSIGNING', 'RUNNING') OR mandelbox_id IS NOT NULL)
) STRICT;

-- The last line of defence against double allocation: a box carries at most
-- one live session, whatever the application code does.
CREATE UNIQUE INDEX sessions_one_per_mandelbox ON sessions (mandelbox_id)
    WHERE state IN ('ASSIGNING', 'RUNNING');
-- Session limit and a user's session list.
CREATE INDEX sessions_user_state ON sessions (user_id, state);
-- Pending queue and its expiry.
CREATE INDEX sessions_state_created_at ON sessions (state, created_at);
-- The session on a box, when the box finishes.
CREATE INDEX sessions_mandelbox ON sessions (mandelbox_id);
CREATE INDEX sessions_created_at ON sessions (created_at);

-- Per-environment configuration layer (defaults < file < this table < env).
CREATE TABLE config (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
) STRICT;
