-- 102: the address a Shared network's virtual router holds on it (taken from the network's
-- range at creation, reserved from guests, kept by every replacement router). NULL: the
-- router is the network's gateway (Isolated networks).
ALTER TABLE networks ADD COLUMN router_ip TEXT;
