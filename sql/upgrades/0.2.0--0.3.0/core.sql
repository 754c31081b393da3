-- Both editions. The projector lease moves only through its functions (try_lead, release_lead,
-- and acquire_lease, now SECURITY DEFINER): the projecting role could set a token that deposed
-- the leader and made token + 1 overflow for everyone.
revoke insert, update on cqrs.projector_lease from cqrs_projector;
