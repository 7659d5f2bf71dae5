-- Initial schema. Times are UNIX seconds (REAL).
CREATE TABLE repositories (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL
);

-- A blob held by a repository; review_after is when GC may look at it again.
CREATE TABLE repo_blobs (
    repo_id      INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    digest       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    review_after REAL NOT NULL,
    PRIMARY KEY (repo_id, digest)
) WITHOUT ROWID;
CREATE INDEX repo_blobs_digest ON repo_blobs (digest);
CREATE INDEX repo_blobs_review ON repo_blobs (review_after);

CREATE TABLE manifests (
    repo_id       INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    size          INTEGER NOT NULL,
    payload       BLOB NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    REAL NOT NULL,
    review_after  REAL NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX manifests_subject ON manifests (repo_id, subject) WHERE subject IS NOT NULL;

-- What a manifest refers to: blobs (config, layers) and child manifests (index entries).
CREATE TABLE manifest_refs (
    repo_id  INTEGER NOT NULL,
    parent   TEXT NOT NULL,
    child    TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo_id, parent, child),
    FOREIGN KEY (repo_id, parent) REFERENCES manifests (repo_id, digest) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX manifest_refs_child ON manifest_refs (repo_id, child);

CREATE TABLE tags (
    repo_id    INTEGER NOT NULL,
    name       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (repo_id, name),
    FOREIGN KEY (repo_id, digest) REFERENCES manifests (repo_id, digest) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX tags_digest ON tags (repo_id, digest);

CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    repo       TEXT NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX uploads_updated ON uploads (updated_at);
