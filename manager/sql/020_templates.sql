-- 020: system VM templates (registerTemplate / listTemplates). A template names one built
-- system VM image directory (rootfs/ for Embedded, disk.img + kernel for KVM) for one
-- hypervisor; zone_id NULL = every zone. Times are UNIX seconds.
CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    display_text TEXT NOT NULL,
    url TEXT NOT NULL,
    image_dir TEXT NOT NULL,
    image_version TEXT NOT NULL,
    format TEXT NOT NULL,
    hypervisor TEXT NOT NULL,
    zone_id TEXT REFERENCES zones(id),
    template_type TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    checksum TEXT NOT NULL DEFAULT '',
    builtin INTEGER NOT NULL DEFAULT 0,  -- registered automatically from scripts/build-image
    account_id TEXT,
    created REAL NOT NULL,
    removed REAL,
    UNIQUE (name, hypervisor, zone_id)
);
CREATE INDEX templates_hypervisor ON templates(hypervisor);
