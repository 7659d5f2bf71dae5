-- Scrub results: per stored copy, when it was last checked and, when bad, why.
-- A damaged blob is not served until a push of the same content replaces it.
ALTER TABLE repo_blobs ADD COLUMN scrubbed_at REAL;
ALTER TABLE repo_blobs ADD COLUMN damaged TEXT;
ALTER TABLE manifests ADD COLUMN scrubbed_at REAL;
ALTER TABLE manifests ADD COLUMN damaged TEXT;
CREATE INDEX repo_blobs_damaged ON repo_blobs (repo_id) WHERE damaged IS NOT NULL;
CREATE INDEX manifests_damaged ON manifests (repo_id) WHERE damaged IS NOT NULL;
-- xxh3-128 of each blob's bytes, recorded when it was written: a quick scrub
-- finds bit rot at disk speed; a deep scrub rehashes with the digest's algorithm.
CREATE TABLE checksums (
    digest TEXT PRIMARY KEY,
    xxh3   TEXT NOT NULL
) WITHOUT ROWID;
-- One row: where the current pass is, so a restart resumes there.
CREATE TABLE scrub_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    cursor_repo   TEXT,
    cursor_kind   TEXT,
    cursor_digest TEXT,
    pass_started  REAL,
    last_complete REAL
);
