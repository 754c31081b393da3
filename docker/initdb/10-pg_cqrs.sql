-- Runs once, when the container initialises an empty data directory.
create extension if not exists pg_cqrs;
-- the sidecar's role: streams the slot and projects (password from the compose file's secret
-- in production; a fixed one here for the local stack)
create role cqrs_sidecar login replication password 'cqrs_sidecar' in role cqrs_projector;
