-- GC's queue is the review_after column of repo_blobs and manifests: rows GC
-- found in use carry 9e18 (NEVER) and stay out of the range scan below.
CREATE INDEX manifests_review ON manifests (review_after);
