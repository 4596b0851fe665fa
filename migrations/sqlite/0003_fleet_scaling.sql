-- Fleet scaling, SQLite flavour of ../postgres/0003_fleet_scaling.sql (same
-- tables and columns; timestamps INTEGER microseconds, JSON TEXT, UUID TEXT).

ALTER TABLE regions ADD COLUMN buffer INTEGER NOT NULL DEFAULT 0 CHECK (buffer >= 0);
ALTER TABLE regions ADD COLUMN min_instances INTEGER NOT NULL DEFAULT 0 CHECK (min_instances >= 0);
ALTER TABLE regions ADD COLUMN max_instances INTEGER NOT NULL DEFAULT 0 CHECK (max_instances >= 0);
ALTER TABLE regions ADD COLUMN instance_types TEXT NOT NULL DEFAULT '[]'
    CHECK (json_type(instance_types) = 'array');

ALTER TABLE hosts ADD COLUMN terminated_at INTEGER;

CREATE TABLE instances (
    host_id        TEXT PRIMARY KEY,
    region         TEXT NOT NULL,
    instance_id    TEXT UNIQUE,
    instance_type  TEXT NOT NULL,
    capacity       INTEGER NOT NULL CHECK (capacity >= 0),
    image          TEXT NOT NULL,
    state          TEXT NOT NULL
        CHECK (state IN ('LAUNCHING', 'RUNNING', 'DRAINING', 'TERMINATING', 'TERMINATED')),
    launch_token   TEXT NOT NULL,
    rollout_id     TEXT,
    reason         TEXT,
    launched_at    INTEGER NOT NULL,
    connected_at   INTEGER,
    terminated_at  INTEGER,
    updated_at     INTEGER NOT NULL
) STRICT;

CREATE INDEX instances_region_state ON instances (region, state);
CREATE INDEX instances_rollout ON instances (rollout_id) WHERE rollout_id IS NOT NULL;

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL CHECK (epoch > 0),
    expires_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE operations (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('RUNNING', 'SUCCEEDED', 'FAILED', 'ROLLED_BACK')),
    request      TEXT NOT NULL CHECK (json_type(request) = 'object'),
    progress     TEXT NOT NULL CHECK (json_type(progress) = 'object'),
    error        TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    CHECK ((state = 'RUNNING') = (finished_at IS NULL))
) STRICT;

CREATE UNIQUE INDEX operations_one_running ON operations (kind) WHERE state = 'RUNNING';
CREATE INDEX operations_created_at ON operations (created_at);
