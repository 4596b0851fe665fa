-- Fleet scaling: per-region scaling settings, the cloud instances the scaler
-- launched, leases (one scaler per region across replicas, with fencing), and
-- durable admin operations (image rollouts). The SQLite flavour in
-- ../sqlite/0003_fleet_scaling.sql has the same tables and columns.

-- Desired idle mandelboxes, instance bounds and instance types (a JSON array of
-- {"name", "capacity"} in preference order; empty = a fixed fleet, never scaled).
ALTER TABLE regions ADD COLUMN buffer BIGINT NOT NULL DEFAULT 0 CHECK (buffer >= 0);
ALTER TABLE regions ADD COLUMN min_instances BIGINT NOT NULL DEFAULT 0 CHECK (min_instances >= 0);
ALTER TABLE regions ADD COLUMN max_instances BIGINT NOT NULL DEFAULT 0 CHECK (max_instances >= 0);
ALTER TABLE regions ADD COLUMN instance_types JSONB NOT NULL DEFAULT '[]'
    CHECK (jsonb_typeof(instance_types) = 'array');

-- Set when the host's instance was terminated: it is gone for good.
ALTER TABLE hosts ADD COLUMN terminated_at TIMESTAMPTZ;

-- One row per instance the scaler launched, keyed by the host id its hostagent
-- connects as. LAUNCHING → RUNNING (its host said Hello) → DRAINING →
-- TERMINATING → TERMINATED. Rows are kept after termination (history, and the
-- sequence that names new hosts).
CREATE TABLE instances (
    host_id        TEXT PRIMARY KEY,
    region         TEXT NOT NULL,
    -- The provider's id; NULL while the launch call is in flight.
    instance_id    TEXT UNIQUE,
    instance_type  TEXT NOT NULL,
    capacity       BIGINT NOT NULL CHECK (capacity >= 0),
    image          TEXT NOT NULL,
    state          TEXT NOT NULL
        CHECK (state IN ('LAUNCHING', 'RUNNING', 'DRAINING', 'TERMINATING', 'TERMINATED')),
    launch_token   TEXT NOT NULL,
    -- The rollout that launched it, while that rollout runs.
    rollout_id     UUID,
    -- Why it was drained or terminated.
    reason         TEXT,
    launched_at    TIMESTAMPTZ NOT NULL,
    connected_at   TIMESTAMPTZ,
    terminated_at  TIMESTAMPTZ,
    updated_at     TIMESTAMPTZ NOT NULL
);

CREATE INDEX instances_region_state ON instances (region, state);
CREATE INDEX instances_rollout ON instances (rollout_id) WHERE rollout_id IS NOT NULL;

-- A lease names a singleton job ("scaler:us-east-1"). The epoch grows every
-- time the lease changes hands; writes made under a lease check that its holder
-- and epoch are still current, so a stale leader's writes are refused.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       BIGINT NOT NULL CHECK (epoch > 0),
    expires_at  TIMESTAMPTZ NOT NULL
);

-- Long-running admin work with an id (image rollouts), pollable and watchable.
CREATE TABLE operations (
    id           UUID PRIMARY KEY,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('RUNNING', 'SUCCEEDED', 'FAILED', 'ROLLED_BACK')),
    -- What was asked (JSON object) and how far it got (JSON object).
    request      JSONB NOT NULL CHECK (jsonb_typeof(request) = 'object'),
    progress     JSONB NOT NULL CHECK (jsonb_typeof(progress) = 'object'),
    error        TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ,
    CHECK ((state = 'RUNNING') = (finished_at IS NULL))
);

-- At most one running operation of a kind (one rollout at a time).
CREATE UNIQUE INDEX operations_one_running ON operations (kind) WHERE state = 'RUNNING';
CREATE INDEX operations_created_at ON operations (created_at);
