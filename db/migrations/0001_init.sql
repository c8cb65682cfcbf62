-- Tracking schema for ablate. Timestamps are RFC 3339 UTC text with milliseconds.
-- Metric and eval values are REAL and nullable: SQLite stores a NaN as NULL, and a diverged
-- loss must still be recorded; the db crate reads NULL back as NaN.

CREATE TABLE experiments (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    spec_path  TEXT NOT NULL,
    spec_toml  TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- A run is identified by the content hash of its resolved configuration; several experiments
-- may share one run (e.g. a tokenizer), see experiment_runs.
CREATE TABLE runs (
    id         INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('tokenizer', 'classifier', 'generator')),
    name       TEXT NOT NULL,
    cell       TEXT NOT NULL,
    arm        TEXT,
    seed       INTEGER NOT NULL,
    params     TEXT NOT NULL CHECK (json_valid(params)),
    status     TEXT NOT NULL DEFAULT 'queued'
               CHECK (status IN ('queued', 'running', 'finished', 'failed', 'interrupted')),
    stage      TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at TEXT,
    ended_at   TEXT,
    git_commit TEXT,
    git_dirty  INTEGER NOT NULL DEFAULT 0 CHECK (git_dirty IN (0, 1)),
    host       TEXT NOT NULL,
    device     TEXT NOT NULL,
    version    TEXT NOT NULL,
    pid        INTEGER,
    error      TEXT
);

CREATE INDEX runs_status_host ON runs (status, host);

CREATE TABLE experiment_runs (
    experiment_id INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    run_id        INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    PRIMARY KEY (experiment_id, run_id)
);

CREATE INDEX experiment_runs_run ON experiment_runs (run_id);

CREATE TABLE metrics (
    id        INTEGER PRIMARY KEY,
    run_id    INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    step      INTEGER NOT NULL,
    value     REAL,
    wall_time REAL NOT NULL,
    UNIQUE (run_id, key, step)
);

-- The value at the highest step of every (run, key).
CREATE VIEW latest_metrics AS
SELECT m.run_id, m.key, m.step, m.value
FROM metrics m
WHERE m.step = (
    SELECT MAX(m2.step) FROM metrics m2 WHERE m2.run_id = m.run_id AND m2.key = m.key
);

CREATE TABLE evals (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step         INTEGER NOT NULL,
    metric       TEXT NOT NULL,
    value        REAL,
    sample_count INTEGER NOT NULL,
    feature_net  TEXT NOT NULL,
    settings     TEXT NOT NULL CHECK (json_valid(settings)),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, step, metric, feature_net, settings)
);

CREATE TABLE artifacts (
    id         INTEGER PRIMARY KEY,
    run_id     INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    path       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, kind, path)
);

CREATE TABLE baselines (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    experiment_id INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    payload       TEXT NOT NULL CHECK (json_valid(payload)),
    UNIQUE (name, experiment_id)
);
