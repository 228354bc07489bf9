-- Parley's first schema: settings, extensions, and the UDP registrations
-- that must survive a restart.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- SIP secrets are kept only as digest HA1 values, one per algorithm,
-- computed for `realm`.
CREATE TABLE extensions (
    number      TEXT PRIMARY KEY NOT NULL
                CHECK (length(number) BETWEEN 1 AND 32 AND number NOT GLOB '*[^0-9A-Za-z._-]*'),
    name        TEXT CHECK (name IS NULL OR length(name) <= 64),
    realm       TEXT NOT NULL,
    ha1_md5     TEXT NOT NULL CHECK (length(ha1_md5) = 32),
    ha1_sha256  TEXT NOT NULL CHECK (length(ha1_sha256) = 64),
    encryption  TEXT NOT NULL DEFAULT 'required-remote'
                CHECK (encryption IN ('required', 'required-remote', 'preferred', 'off')),
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Bumped by every change to extensions, so a running server notices edits
-- made by the command line without reloading on a timer blindly.
CREATE TABLE revisions (
    name     TEXT PRIMARY KEY NOT NULL,
    revision INTEGER NOT NULL
);
INSERT INTO revisions (name, revision) VALUES ('extensions', 0);

CREATE TRIGGER extensions_insert AFTER INSERT ON extensions
BEGIN UPDATE revisions SET revision = revision + 1 WHERE name = 'extensions'; END;
CREATE TRIGGER extensions_update AFTER UPDATE ON extensions
BEGIN UPDATE revisions SET revision = revision + 1 WHERE name = 'extensions'; END;
CREATE TRIGGER extensions_delete AFTER DELETE ON extensions
BEGIN UPDATE revisions SET revision = revision + 1 WHERE name = 'extensions'; END;

-- UDP bindings (TCP/TLS ones live and die with their connection).
CREATE TABLE bindings (
    extension   TEXT NOT NULL REFERENCES extensions(number) ON DELETE CASCADE,
    binding_key TEXT NOT NULL,
    contact     TEXT NOT NULL,
    instance    TEXT,
    reg_id      INTEGER,
    call_id     TEXT NOT NULL,
    cseq        INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    local_addr  TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    user_agent  TEXT,
    PRIMARY KEY (extension, binding_key)
);
