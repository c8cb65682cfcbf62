-- Experiment versions: a spec whose resolved configuration differs from the one stored under its
-- name is a new version of the experiment, and every run is linked to the version(s) that planned
-- it, so that a report shows one version and never mixes configurations.
CREATE TABLE experiment_versions (
    experiment_id INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    version       INTEGER NOT NULL,
    -- content hash of the resolved configuration; '' for the runs recorded before versions
    config_hash   TEXT NOT NULL,
    spec_toml     TEXT NOT NULL,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (experiment_id, version)
);

INSERT INTO experiment_versions (experiment_id, version, config_hash, spec_toml)
SELECT id, 1, '', spec_toml FROM experiments;

CREATE TABLE experiment_runs_versioned (
    experiment_id INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    version       INTEGER NOT NULL,
    run_id        INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    PRIMARY KEY (experiment_id, version, run_id)
);

INSERT INTO experiment_runs_versioned (experiment_id, version, run_id, position)
SELECT experiment_id, 1, run_id, position FROM experiment_runs;

DROP TABLE experiment_runs;
ALTER TABLE experiment_runs_versioned RENAME TO experiment_runs;
CREATE INDEX experiment_runs_run ON experiment_runs (run_id);
