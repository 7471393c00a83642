-- 001: the manager's first schema. Times are UNIX seconds (REAL); JSON columns are TEXT.
CREATE TABLE zones (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    allocation_state TEXT NOT NULL,
    network_type TEXT NOT NULL,
    dns1 TEXT NOT NULL,
    internal_dns1 TEXT NOT NULL,
    public_cidr TEXT NOT NULL,
    guest_cidr TEXT NOT NULL,
    linklocal_cidr TEXT NOT NULL,
    created REAL NOT NULL
);

CREATE TABLE pods (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    name TEXT NOT NULL,
    gateway TEXT NOT NULL,
    netmask TEXT NOT NULL,
    start_ip TEXT NOT NULL,
    end_ip TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (zone_id, name)
);

CREATE TABLE clusters (
    id TEXT PRIMARY KEY,
    pod_id TEXT NOT NULL REFERENCES pods(id),
    zone_id TEXT NOT NULL REFERENCES zones(id),
    name TEXT NOT NULL,
    hypervisor TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (pod_id, name)
);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    cluster_id TEXT NOT NULL REFERENCES clusters(id),
    pod_id TEXT NOT NULL REFERENCES pods(id),
    zone_id TEXT NOT NULL REFERENCES zones(id),
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    hypervisor TEXT NOT NULL,
    ip_address TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL
);

CREATE TABLE system_vms (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    zone_id TEXT NOT NULL REFERENCES zones(id),
    pod_id TEXT REFERENCES pods(id),
    host_id TEXT REFERENCES hosts(id),
    state TEXT NOT NULL,
    template_id TEXT,
    hypervisor TEXT NOT NULL,
    public_ip TEXT,
    private_ip TEXT,
    linklocal_ip TEXT,
    desired_version INTEGER NOT NULL DEFAULT 0,
    applied_version INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT,
    image_version TEXT,
    last_seen REAL,
    created REAL NOT NULL,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX system_vms_zone ON system_vms(zone_id);

CREATE TABLE enrolment_tokens (
    token_hash BLOB PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES system_vms(id),
    expires_at REAL NOT NULL,
    used_at REAL,
    superseded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX enrolment_tokens_vm ON enrolment_tokens(vm_id);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,  -- decimal text: X.509 serials exceed SQLite's 64-bit integers
    vm_id TEXT NOT NULL REFERENCES system_vms(id),
    not_after REAL NOT NULL,
    revoked_at REAL,
    revoke_reason TEXT
);
CREATE INDEX certificates_vm ON certificates(vm_id);

CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES system_vms(id),
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    completed REAL
);
CREATE INDEX commands_pending ON commands(vm_id, state);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    account_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    result_code INTEGER NOT NULL,
    result_type TEXT NOT NULL,
    result TEXT NOT NULL,
    instance_type TEXT,
    instance_id TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX jobs_status ON jobs(status);

CREATE TABLE events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    level TEXT NOT NULL,
    description TEXT NOT NULL,
    account_id TEXT,
    resource_id TEXT,
    created REAL NOT NULL
);
CREATE INDEX events_created ON events(created);

CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    type INTEGER NOT NULL,
    name TEXT NOT NULL,
    subject TEXT NOT NULL,
    description TEXT NOT NULL,
    zone_id TEXT,
    created REAL NOT NULL
);
CREATE INDEX alerts_created ON alerts(created);

-- Only explicitly set values; defaults live in manager.settings.SETTINGS.
-- scope_id is '' for global scope so the primary key stays total.
CREATE TABLE setting_values (
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    value TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (name, scope, scope_id)
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    username TEXT NOT NULL,
    account_name TEXT NOT NULL,
    account_type INTEGER NOT NULL,
    domain_id TEXT NOT NULL,
    apikey TEXT NOT NULL UNIQUE,
    secretkey TEXT NOT NULL,
    state TEXT NOT NULL
);
