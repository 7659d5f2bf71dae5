-- One writer per upload session at a time, across processes and replicas: a
-- PATCH takes the lease (compare-and-set on the received length), renews it
-- while bytes arrive, and gives it back with the new length. Without it, a
-- writer that lost the race could overwrite bytes another had recorded.
ALTER TABLE uploads ADD COLUMN writer TEXT;
ALTER TABLE uploads ADD COLUMN lease_until DOUBLE PRECISION;
