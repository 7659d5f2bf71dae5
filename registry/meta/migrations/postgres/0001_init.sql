-- Initial schema. Times are UNIX seconds. Names sort bytewise (COLLATE "C"), as
-- the spec's lexical order wants, and the btree on them serves both the catalog
-- walk (name > $1 ORDER BY name) and subtree listing (name LIKE 'team/%').
CREATE TABLE repositories (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at    DOUBLE PRECISION NOT NULL,
    layout_gen    BIGINT NOT NULL DEFAULT 0,
    layout_synced BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX repositories_layout_stale ON repositories (id) WHERE layout_gen > layout_synced;

CREATE TABLE repo_blobs (
    repo_id      BIGINT NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest       TEXT NOT NULL,
    size         BIGINT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    review_after DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX repo_blobs_digest ON repo_blobs (digest);
CREATE INDEX repo_blobs_review ON repo_blobs (review_after);

CREATE TABLE manifests (
    repo_id       BIGINT NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    size          BIGINT NOT NULL,
    payload       BYTEA NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    DOUBLE PRECISION NOT NULL,
    review_after  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo_id, digest)
);
CREATE INDEX manifests_subject ON manifests (repo_id, subject) WHERE subject IS NOT NULL;

CREATE TABLE manifest_refs (
    repo_id BIGINT NOT NULL,
    parent  TEXT NOT NULL,
    child   TEXT NOT NULL,
    kind    TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo_id, parent, child),
    FOREIGN KEY (repo_id, parent) REFERENCES manifests (repo_id, digest) ON DELETE CASCADE
);
CREATE INDEX manifest_refs_child ON manifest_refs (repo_id, child);

CREATE TABLE tags (
    repo_id    BIGINT NOT NULL,
    name       TEXT COLLATE "C" NOT NULL,
    digest     TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (repo_id, name),
    FOREIGN KEY (repo_id, digest) REFERENCES manifests (repo_id, digest) ON DELETE CASCADE
);
CREATE INDEX tags_digest ON tags (repo_id, digest);

CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    repo       TEXT NOT NULL,
    size       BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX uploads_updated ON uploads (updated_at);

-- The id of a repository, created on first use. Two statements, so the SELECT
-- sees a row a concurrent transaction committed while the INSERT waited on it.
CREATE FUNCTION registry_repo_id(p_name TEXT, p_now DOUBLE PRECISION) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
BEGIN
    SELECT id INTO rid FROM repositories WHERE name = p_name;
    IF FOUND THEN
        RETURN rid;
    END IF;
    INSERT INTO repositories (name, created_at) VALUES (p_name, p_now) ON CONFLICT (name) DO NOTHING;
    SELECT id INTO rid FROM repositories WHERE name = p_name;
    RETURN rid;
END $$;

-- A manifest push in one round trip: check every reference (locking the rows
-- it relies on, so GC cannot delete them before commit), insert the manifest
-- and its references, move the tags. Returns what is missing or mis-sized;
-- when either is non-empty nothing was written.
CREATE FUNCTION registry_manifest_put(
    p_repo TEXT, p_digest TEXT, p_media_type TEXT, p_size BIGINT, p_payload BYTEA, p_subject TEXT,
    p_artifact_type TEXT, p_annotations TEXT, p_ref_digests TEXT[], p_ref_kinds TEXT[], p_ref_sizes BIGINT[],
    p_tags TEXT[], p_now DOUBLE PRECISION, p_review_after DOUBLE PRECISION,
    OUT missing TEXT[], OUT wrong_size TEXT[])
LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
    i INT;
    found_size BIGINT;
BEGIN
    missing := '{}';
    wrong_size := '{}';
    rid := registry_repo_id(p_repo, p_now);
    FOR i IN 1 .. coalesce(array_length(p_ref_digests, 1), 0) LOOP
        IF p_ref_kinds[i] = 'blob' THEN
            SELECT size INTO found_size FROM repo_blobs WHERE repo_id = rid AND digest = p_ref_digests[i] FOR SHARE;
        ELSE
            SELECT size INTO found_size FROM manifests WHERE repo_id = rid AND digest = p_ref_digests[i] FOR SHARE;
        END IF;
        IF NOT FOUND THEN
            missing := missing || p_ref_digests[i];
        ELSIF found_size <> p_ref_sizes[i] THEN
            wrong_size := wrong_size || (p_ref_digests[i] || ' is ' || found_size || ' bytes, not ' || p_ref_sizes[i]);
        END IF;
    END LOOP;
    IF cardinality(missing) > 0 OR cardinality(wrong_size) > 0 THEN
        RETURN;
    END IF;
    INSERT INTO manifests (repo_id, digest, media_type, size, payload, subject, artifact_type, annotations,
                           created_at, review_after)
    VALUES (rid, p_digest, p_media_type, p_size, p_payload, p_subject, p_artifact_type, p_annotations,
            p_now, p_review_after)
    ON CONFLICT (repo_id, digest) DO NOTHING;
    IF FOUND THEN
        INSERT INTO manifest_refs (repo_id, parent, child, kind)
        SELECT rid, p_digest, d, k FROM unnest(p_ref_digests, p_ref_kinds) AS u (d, k)
        ON CONFLICT DO NOTHING;
    END IF;
    UPDATE repositories SET layout_gen = layout_gen + 1 WHERE id = rid;
    INSERT INTO tags (repo_id, name, digest, updated_at)
    SELECT rid, t, p_digest, p_now FROM unnest(p_tags) AS t
    ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at;
END $$;
