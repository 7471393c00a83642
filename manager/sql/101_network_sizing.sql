-- 101: router sizing per network offering (CloudStack's createNetworkOffering
-- serviceofferingid): NULL = the network keeps its router service offering.
ALTER TABLE network_offerings ADD COLUMN service_offering_id TEXT
    REFERENCES router_service_offerings(id);
