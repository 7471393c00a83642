-- 100: guest networks and the virtual router's model (manager/network). Times are UNIX
-- seconds (REAL). Port ranges are inclusive; NULL start/end port = all ports.

CREATE TABLE network_offerings (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    display_text TEXT NOT NULL,
    guest_ip_type TEXT NOT NULL,            -- Isolated | Shared
    services TEXT NOT NULL,                 -- JSON list: Dhcp, Dns, UserData, SourceNat, ...
    egress_default_allow INTEGER NOT NULL,  -- 1: egress allowed unless a rule says otherwise
    specify_ip_ranges INTEGER NOT NULL,
    is_default INTEGER NOT NULL,
    state TEXT NOT NULL,                    -- Enabled | Disabled
    created REAL NOT NULL
);

-- The system service offering routers run with (CloudStack: issystem=true,
-- systemvmtype=domainrouter).
CREATE TABLE router_service_offerings (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    display_text TEXT NOT NULL,
    cpu_number INTEGER NOT NULL,
    cpu_speed INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    is_default INTEGER NOT NULL,
    created REAL NOT NULL
);

CREATE TABLE networks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    display_text TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    offering_id TEXT NOT NULL REFERENCES network_offerings(id),
    service_offering_id TEXT REFERENCES router_service_offerings(id),
    guest_type TEXT NOT NULL,               -- Isolated | Shared
    state TEXT NOT NULL,                    -- Allocated | Implemented | Setup | Destroy
    cidr TEXT NOT NULL,
    gateway TEXT NOT NULL,
    start_ip TEXT NOT NULL,
    end_ip TEXT NOT NULL,
    network_domain TEXT NOT NULL,
    dns1 TEXT,
    dns2 TEXT,
    vlan TEXT,
    account_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX networks_zone ON networks(zone_id);

-- Routers serving a network (system_vms with role domainrouter). A rolling replacement
-- (restartNetwork cleanup=true) has two rows for a while.
CREATE TABLE network_routers (
    router_id TEXT PRIMARY KEY,
    network_id TEXT NOT NULL REFERENCES networks(id),
    created REAL NOT NULL
);
CREATE INDEX network_routers_network ON network_routers(network_id);

CREATE TABLE public_ips (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    address TEXT NOT NULL,
    network_id TEXT REFERENCES networks(id),
    is_source_nat INTEGER NOT NULL DEFAULT 0,
    static_nat_vm_id TEXT,                  -- guest VM id when static NAT is on
    static_nat_ip TEXT,                     -- its guest IP
    account_id TEXT NOT NULL,
    allocated REAL NOT NULL,
    UNIQUE (zone_id, address)
);
CREATE INDEX public_ips_network ON public_ips(network_id);

-- Ingress firewall (purpose Firewall, on a public IP) and egress firewall (on the network).
CREATE TABLE firewall_rules (
    id TEXT PRIMARY KEY,
    network_id TEXT NOT NULL REFERENCES networks(id),
    traffic_type TEXT NOT NULL,             -- Ingress | Egress
    public_ip_id TEXT REFERENCES public_ips(id),
    protocol TEXT NOT NULL,                 -- tcp | udp | icmp | all
    start_port INTEGER,
    end_port INTEGER,
    icmp_type INTEGER,
    icmp_code INTEGER,
    cidrs TEXT NOT NULL,                    -- JSON list (source for ingress, dest for egress)
    related_rule_id TEXT,                   -- the PF/LB rule that opened it (openfirewall)
    account_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX firewall_rules_network ON firewall_rules(network_id);

CREATE TABLE port_forwarding_rules (
    id TEXT PRIMARY KEY,
    network_id TEXT NOT NULL REFERENCES networks(id),
    public_ip_id TEXT NOT NULL REFERENCES public_ips(id),
    protocol TEXT NOT NULL,                 -- tcp | udp
    public_start INTEGER NOT NULL,
    public_end INTEGER NOT NULL,
    private_start INTEGER NOT NULL,
    private_end INTEGER NOT NULL,
    vm_id TEXT NOT NULL,
    vm_ip TEXT NOT NULL,
    cidrs TEXT NOT NULL,
    account_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX port_forwarding_rules_network ON port_forwarding_rules(network_id);

CREATE TABLE lb_rules (
    id TEXT PRIMARY KEY,
    network_id TEXT NOT NULL REFERENCES networks(id),
    public_ip_id TEXT NOT NULL REFERENCES public_ips(id),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    algorithm TEXT NOT NULL,                -- roundrobin | leastconn | source
    public_port INTEGER NOT NULL,
    private_port INTEGER NOT NULL,
    protocol TEXT NOT NULL,                 -- tcp
    cidrs TEXT NOT NULL,
    account_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX lb_rules_network ON lb_rules(network_id);

CREATE TABLE lb_members (
    rule_id TEXT NOT NULL REFERENCES lb_rules(id) ON DELETE CASCADE,
    vm_id TEXT NOT NULL,
    vm_ip TEXT NOT NULL,
    PRIMARY KEY (rule_id, vm_id)
);

-- A guest VM's NIC on a network: its DHCP reservation, DNS name and userdata.
CREATE TABLE guest_nics (
    id TEXT PRIMARY KEY,
    network_id TEXT NOT NULL REFERENCES networks(id),
    vm_id TEXT NOT NULL,
    name TEXT NOT NULL,                     -- hostname (DHCP, DNS)
    mac TEXT NOT NULL,
    ip TEXT NOT NULL,
    userdata TEXT NOT NULL DEFAULT '',      -- base64, as the API takes it
    created REAL NOT NULL,
    UNIQUE (network_id, vm_id),
    UNIQUE (network_id, ip),
    UNIQUE (network_id, mac)
);
CREATE INDEX guest_nics_vm ON guest_nics(vm_id);

-- Traffic: totals per network and public IP, fed by router.stats deltas. A batch id
-- ("<boot id>:<seq>") is counted once per router, however often it is re-sent.
CREATE TABLE network_traffic (
    network_id TEXT NOT NULL,
    public_ip TEXT NOT NULL,
    bytes_received INTEGER NOT NULL,
    bytes_sent INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (network_id, public_ip)
);

CREATE TABLE router_stats_batches (
    router_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (router_id, batch_id)
);
CREATE INDEX router_stats_batches_received ON router_stats_batches(received);
