-- index.json bookkeeping: every tag or manifest change bumps layout_gen; after
-- index.json is rewritten, layout_synced catches up. A repository whose
-- layout_gen is ahead after a crash gets its index.json rewritten at start-up.
ALTER TABLE repositories ADD COLUMN layout_gen INTEGER NOT NULL DEFAULT 0;
ALTER TABLE repositories ADD COLUMN layout_synced INTEGER NOT NULL DEFAULT 0;
CREATE INDEX repositories_layout_stale ON repositories (id) WHERE layout_gen > layout_synced;
