-- index.json bookkeeping without a hot row. Every tag or manifest change used to
-- bump repositories.layout_gen: that row lock made concurrent pushes to one
-- repository wait for each other's commit. A change now appends a row here,
-- which no other writer waits for; a rewrite of index.json deletes the rows it
-- read, once the file is written, so a crash in between leaves them for the
-- repair at start-up.
CREATE TABLE layout_changes (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repo_id BIGINT NOT NULL
);
CREATE INDEX layout_changes_repo ON layout_changes (repo_id);
INSERT INTO layout_changes (repo_id) SELECT id FROM repositories WHERE layout_gen > layout_synced;
DROP INDEX repositories_layout_stale;
ALTER TABLE repositories DROP COLUMN layout_gen, DROP COLUMN layout_synced;

-- Locks are taken in one order everywhere: tag names first (transaction
-- advisory locks, by key: a name not created yet cannot be row-locked, and a
-- push or a tag delete racing to create or remove it must still queue behind
-- the first), then manifest rows by digest. The previous functions locked tags
-- after manifests, and a tag delete or another push racing a push deadlocked
-- until PostgreSQL broke the tie a second later.
CREATE FUNCTION registry_lock_tags(p_rid BIGINT, p_names TEXT[]) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    k BIGINT;
BEGIN
    IF cardinality(p_names) = 1 THEN  -- the common case, without the sort
        PERFORM pg_advisory_xact_lock(hashtextextended(current_schema() || '/' || p_rid || '/' || p_names[1], 0));
        RETURN;
    END IF;
    FOR k IN SELECT DISTINCT hashtextextended(current_schema() || '/' || p_rid || '/' || n, 0)
             FROM unnest(p_names) AS n ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION registry_manifest_delete_in(p_rid BIGINT, p_digest TEXT, p_at DOUBLE PRECISION)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    blobs TEXT[];
    others TEXT[];
BEGIN
    PERFORM registry_lock_tags(p_rid, ARRAY(SELECT name FROM tags WHERE repo_id = p_rid AND digest = p_digest));
    SELECT coalesce(array_agg(child) FILTER (WHERE kind = 'blob'), '{}'),
           coalesce(array_agg(child) FILTER (WHERE kind = 'manifest'), '{}')
    INTO blobs, others FROM manifest_refs WHERE repo_id = p_rid AND parent = p_digest;
    others := others || ARRAY(SELECT digest FROM manifests WHERE repo_id = p_rid AND subject = p_digest);
    DELETE FROM manifests WHERE repo_id = p_rid AND digest = p_digest;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM registry_requeue(p_rid, 'blob', blobs, p_at);
    PERFORM registry_requeue(p_rid, 'manifest', others, p_at);
    INSERT INTO layout_changes (repo_id) VALUES (p_rid);
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION registry_tag_delete(p_repo TEXT, p_tag TEXT, p_at DOUBLE PRECISION)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
    was TEXT;
BEGIN
    SELECT id INTO rid FROM repositories WHERE name = p_repo;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM registry_lock_tags(rid, ARRAY[p_tag]);
    DELETE FROM tags WHERE repo_id = rid AND name = p_tag RETURNING digest INTO was;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM registry_requeue(rid, 'manifest', ARRAY[was], p_at);
    INSERT INTO layout_changes (repo_id) VALUES (rid);
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION registry_manifest_put(
    p_repo TEXT, p_digest TEXT, p_media_type TEXT, p_size BIGINT, p_payload BYTEA, p_subject TEXT,
    p_artifact_type TEXT, p_annotations TEXT, p_ref_digests TEXT[], p_ref_kinds TEXT[], p_ref_sizes BIGINT[],
    p_tags TEXT[], p_now DOUBLE PRECISION, p_review_after DOUBLE PRECISION,
    OUT missing TEXT[], OUT wrong_size TEXT[])
LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
    i INT;
    found_size BIGINT;
    moved TEXT[];
BEGIN
    missing := '{}';
    wrong_size := '{}';
    rid := registry_repo_id(p_repo, p_now);
    -- The tags this push moves, locked first (see above); what they pointed at is queued below.
    PERFORM registry_lock_tags(rid, p_tags);
    SELECT coalesce(array_agg(DISTINCT t.digest) FILTER (WHERE t.digest <> p_digest), '{}') INTO moved
    FROM (SELECT digest FROM tags WHERE repo_id = rid AND name = ANY (p_tags) ORDER BY name FOR UPDATE) t;
    -- Then the manifest rows it changes, in digest order: two pushes each moving a tag away
    -- from the other's manifest would otherwise lock the two rows in opposite orders.
    PERFORM 1 FROM manifests WHERE repo_id = rid AND digest = ANY (moved || p_digest) ORDER BY digest FOR UPDATE;
    FOR i IN SELECT u.n FROM unnest(p_ref_digests) WITH ORDINALITY AS u (d, n) ORDER BY u.d LOOP  -- digest order
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
    ON CONFLICT (repo_id, digest) DO UPDATE SET review_after = greatest(manifests.review_after, excluded.review_after);
    INSERT INTO manifest_refs (repo_id, parent, child, kind)
    SELECT rid, p_digest, d, k FROM unnest(p_ref_digests, p_ref_kinds) AS u (d, k)
    ON CONFLICT DO NOTHING;
    IF cardinality(moved) > 0 THEN
        PERFORM registry_requeue(rid, 'manifest', moved, p_review_after);
    END IF;
    -- Each name once (ON CONFLICT cannot update one row twice), in name order.
    INSERT INTO tags (repo_id, name, digest, updated_at)
    SELECT rid, t, p_digest, p_now FROM (SELECT DISTINCT t FROM unnest(p_tags) AS t) u ORDER BY t COLLATE "C"
    ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at;
    INSERT INTO layout_changes (repo_id) VALUES (rid);
END $$;

-- The two ends of an index.json rewrite, each one round trip on the connection
-- that holds the repository's advisory lock meanwhile (a session lock: the file
-- is written between the two calls). The first takes the lock, then reads,
-- with a snapshot taken after the lock, the changes the rewrite covers (a row
-- with a NULL digest carrying their ids) and the entries index.json lists.
CREATE FUNCTION registry_layout_begin(p_repo TEXT, p_lock TEXT)
RETURNS TABLE (tag TEXT, digest TEXT, media_type TEXT, size BIGINT, artifact_type TEXT, changes BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
BEGIN
    PERFORM pg_advisory_lock(hashtextextended(p_lock, 0));
    SELECT id INTO rid FROM repositories WHERE name = p_repo;
    RETURN QUERY
        SELECT NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT, NULL::TEXT,
               coalesce((SELECT array_agg(c.id) FROM layout_changes c WHERE c.repo_id = rid), '{}')
        UNION ALL
        -- One pass over the manifests: each with its tags, or once untagged unless an index
        -- lists it. OFFSET 0 keeps both lookups index probes per manifest: planned without
        -- statistics (a new schema) as joins, they scanned all tags per manifest (17 ms
        -- instead of 2 for 500 manifests, at every rewrite).
        SELECT t.name::TEXT, m.digest, m.media_type, m.size, m.artifact_type, NULL FROM manifests m
        LEFT JOIN LATERAL (SELECT g.name FROM tags g WHERE g.repo_id = m.repo_id AND g.digest = m.digest OFFSET 0) t
            ON true
        WHERE m.repo_id = rid AND (t.name IS NOT NULL OR NOT EXISTS (
            SELECT 1 FROM manifest_refs x WHERE x.repo_id = m.repo_id AND x.child = m.digest
            AND x.kind = 'manifest' OFFSET 0));
END $$;

-- Its commit does not wait for the WAL flush: losing it in a crash only makes
-- the start-up repair rewrite an index.json that was already right.
CREATE FUNCTION registry_layout_end(p_lock TEXT, p_changes BIGINT[]) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM layout_changes WHERE id = ANY (p_changes);
    PERFORM pg_advisory_unlock(hashtextextended(p_lock, 0));
END $$;

-- Existence checks that postpone GC (services/blobs.py, postpone), many in one
-- transaction (meta/pg_batch.py). Each row is written even when its time stays
-- (in use, or already later), so FOUND says whether it exists once locked: a GC
-- pass that deleted it first is seen. Rows are taken in (repository, digest)
-- order, as a push takes what it refers to, so two batches, or a batch and a
-- push, never wait for each other in a cycle. Returns the positions of the keys
-- whose row exists.
CREATE FUNCTION registry_touch(p_kind TEXT, p_repos TEXT[], p_digests TEXT[], p_at DOUBLE PRECISION[])
RETURNS SETOF BIGINT LANGUAGE plpgsql AS $$
DECLARE
    k RECORD;
    rid BIGINT;
BEGIN
    FOR k IN SELECT q.a, q.b, q.t, q.i FROM unnest(p_repos, p_digests, p_at) WITH ORDINALITY AS q (a, b, t, i)
             ORDER BY q.a COLLATE "C", q.b LOOP
        SELECT id INTO rid FROM repositories WHERE name = k.a;
        CONTINUE WHEN NOT FOUND;
        IF p_kind = 'blob' THEN
            UPDATE repo_blobs SET review_after = CASE WHEN review_after < k.t AND review_after < 9e18 THEN k.t
                                                      ELSE review_after END
            WHERE repo_id = rid AND digest = k.b;
        ELSE
            UPDATE manifests SET review_after = CASE WHEN review_after < k.t AND review_after < 9e18 THEN k.t
                                                     ELSE review_after END
            WHERE repo_id = rid AND digest = k.b;
        END IF;
        IF FOUND THEN
            RETURN NEXT k.i;
        END IF;
    END LOOP;
END $$;
