-- GC's queue is the review_after column of repo_blobs and manifests. Rows GC
-- found in use carry 9e18 (NEVER) and stay out of the range scans; events that
-- can make a row unused put it back (registry_requeue).
CREATE INDEX manifests_review ON manifests (review_after);

CREATE FUNCTION registry_requeue(p_rid BIGINT, p_kind TEXT, p_digests TEXT[], p_at DOUBLE PRECISION)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'blob' THEN
        UPDATE repo_blobs SET review_after = CASE WHEN review_after >= 9e18 THEN p_at
                                                  ELSE greatest(review_after, p_at) END
        WHERE repo_id = p_rid AND digest = ANY (p_digests);
    ELSE
        UPDATE manifests SET review_after = CASE WHEN review_after >= 9e18 THEN p_at
                                                 ELSE greatest(review_after, p_at) END
        WHERE repo_id = p_rid AND digest = ANY (p_digests);
    END IF;
END $$;

-- Delete a manifest (tags and references cascade) and queue what it referred
-- to and its referrers.
CREATE FUNCTION registry_manifest_delete_in(p_rid BIGINT, p_digest TEXT, p_at DOUBLE PRECISION)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    blobs TEXT[];
    others TEXT[];
BEGIN
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
    UPDATE repositories SET layout_gen = layout_gen + 1 WHERE id = p_rid;
    RETURN true;
END $$;

CREATE FUNCTION registry_manifest_delete(p_repo TEXT, p_digest TEXT, p_at DOUBLE PRECISION)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
BEGIN
    SELECT id INTO rid FROM repositories WHERE name = p_repo;
    RETURN FOUND AND registry_manifest_delete_in(rid, p_digest, p_at);
END $$;

CREATE FUNCTION registry_tag_delete(p_repo TEXT, p_tag TEXT, p_at DOUBLE PRECISION)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    rid BIGINT;
    was TEXT;
BEGIN
    SELECT id INTO rid FROM repositories WHERE name = p_repo;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM tags WHERE repo_id = rid AND name = p_tag RETURNING digest INTO was;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM registry_requeue(rid, 'manifest', ARRAY[was], p_at);
    UPDATE repositories SET layout_gen = layout_gen + 1 WHERE id = rid;
    RETURN true;
END $$;

-- The manifest row is now inserted or locked (DO UPDATE), so a GC pass that
-- holds it FOR UPDATE is waited for and a concurrent deletion is retried as an
-- insert; manifests a tag moves away from are queued.
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
    ON CONFLICT (repo_id, digest) DO UPDATE SET review_after = greatest(manifests.review_after, excluded.review_after);
    INSERT INTO manifest_refs (repo_id, parent, child, kind)
    SELECT rid, p_digest, d, k FROM unnest(p_ref_digests, p_ref_kinds) AS u (d, k)
    ON CONFLICT DO NOTHING;
    PERFORM registry_requeue(rid, 'manifest', ARRAY(SELECT DISTINCT digest FROM tags WHERE repo_id = rid
                                                    AND name = ANY (p_tags) AND digest <> p_digest), p_review_after);
    UPDATE repositories SET layout_gen = layout_gen + 1 WHERE id = rid;
    INSERT INTO tags (repo_id, name, digest, updated_at)
    SELECT rid, t, p_digest, p_now FROM unnest(p_tags) AS t
    ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at;
END $$;

-- One GC batch: each candidate is locked (SKIP LOCKED: a push holding it wins),
-- re-checked with a fresh snapshot, then deleted or taken out of the queue.
-- Returns the 1-based positions of the deleted candidates.
CREATE FUNCTION registry_gc_collect(p_repos TEXT[], p_kinds TEXT[], p_digests TEXT[], p_now DOUBLE PRECISION,
                                    p_delete_untagged BOOLEAN, p_dry_run BOOLEAN, p_requeue_at DOUBLE PRECISION)
RETURNS SETOF INT LANGUAGE plpgsql AS $$
DECLARE
    i INT;
    rid BIGINT;
    ra DOUBLE PRECISION;
    subj TEXT;
    in_use BOOLEAN;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_digests, 1), 0) LOOP
        SELECT id INTO rid FROM repositories WHERE name = p_repos[i];
        CONTINUE WHEN NOT FOUND;
        IF p_kinds[i] = 'blob' THEN
            SELECT review_after INTO ra FROM repo_blobs WHERE repo_id = rid AND digest = p_digests[i]
            FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND OR ra > p_now;
            in_use := EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = rid AND child = p_digests[i] AND kind = 'blob');
            IF in_use THEN
                IF NOT p_dry_run THEN
                    UPDATE repo_blobs SET review_after = 9e18 WHERE repo_id = rid AND digest = p_digests[i];
                END IF;
                CONTINUE;
            END IF;
            IF NOT p_dry_run THEN
                DELETE FROM repo_blobs WHERE repo_id = rid AND digest = p_digests[i];
            END IF;
            RETURN NEXT i;
        ELSE
            SELECT review_after, subject INTO ra, subj FROM manifests WHERE repo_id = rid AND digest = p_digests[i]
            FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND OR ra > p_now;
            in_use := EXISTS (SELECT 1 FROM tags WHERE repo_id = rid AND digest = p_digests[i])
                OR EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = rid AND child = p_digests[i] AND kind = 'manifest')
                OR (subj IS NOT NULL AND EXISTS (SELECT 1 FROM manifests WHERE repo_id = rid AND digest = subj))
                OR (subj IS NULL AND NOT p_delete_untagged);
            IF in_use THEN
                IF NOT p_dry_run THEN
                    UPDATE manifests SET review_after = 9e18 WHERE repo_id = rid AND digest = p_digests[i];
                END IF;
                CONTINUE;
            END IF;
            IF NOT p_dry_run THEN
                PERFORM registry_manifest_delete_in(rid, p_digests[i], p_requeue_at);
            END IF;
            RETURN NEXT i;
        END IF;
    END LOOP;
END $$;
