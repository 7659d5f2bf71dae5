-- Dedupe (issue 5). The dedupe index is repo_blobs_digest (digest -> the
-- repositories holding it); manifests get the same, so the walk over every
-- stored copy pages by digest through indexes.
CREATE INDEX manifests_digest ON manifests (digest);
-- One row: the walk that links duplicate copies ("on") or gives every
-- repository its own copy back ("off"). started is set while a walk is in
-- progress, cursor is the last digest it finished: a restart resumes there.
CREATE TABLE dedupe_state (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    mode      TEXT NOT NULL CHECK (mode IN ('on', 'off')),
    cursor    TEXT,
    started   REAL,
    completed REAL,
    files     INTEGER NOT NULL DEFAULT 0,
    bytes     INTEGER NOT NULL DEFAULT 0
);
