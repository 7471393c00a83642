-- 110: console proxy (manager side): guest VMs, one-time console tokens, proxy load
-- reports with their sessions, sticky assignments. (A drain is system_vms.details
-- "console_draining": it is part of the proxy's desired config.) Times are UNIX seconds (REAL).

-- Guest (user) VMs whose consoles the proxies serve. Their VNC host/port/password live only
-- in the manager's memory (manager.guests: a fresh password on every start), never here.
CREATE TABLE guest_vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    display_name TEXT NOT NULL,
    account_id TEXT NOT NULL,
    zone_id TEXT,
    state TEXT NOT NULL,
    memory_mb INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX guest_vms_account ON guest_vms(account_id);

-- Only sha256(token) is stored. proxy_vm_id: the console proxy the token was issued for;
-- only that proxy may present it.
CREATE TABLE console_tokens (
    token_hash BLOB PRIMARY KEY,
    vm_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    proxy_vm_id TEXT NOT NULL,
    created REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX console_tokens_vm ON console_tokens(vm_id);
CREATE INDEX console_tokens_expiry ON console_tokens(expires_at);

-- The last console.sessions report of each proxy.
CREATE TABLE console_proxy_load (
    proxy_vm_id TEXT PRIMARY KEY,
    sessions INTEGER NOT NULL,
    draining INTEGER NOT NULL,
    reported_at REAL NOT NULL
);

CREATE TABLE console_sessions (
    proxy_vm_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    client TEXT NOT NULL,
    started REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX console_sessions_proxy ON console_sessions(proxy_vm_id);

-- Sticky assignment: a VM's console goes back to this proxy within
-- consoleproxy.session.timeout of assigned_at.
CREATE TABLE console_assignments (
    vm_id TEXT PRIMARY KEY,
    proxy_vm_id TEXT NOT NULL,
    assigned_at REAL NOT NULL
);
