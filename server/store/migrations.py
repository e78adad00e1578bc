"""Schema migrations, forward only: the store runs those past its recorded version.

Each entry is one migration's statements; its index + 1 is the schema version it makes.
"""

SQLITE_MIGRATIONS = [
    # 1: tokens, hosts, history
    """
    CREATE TABLE tokens (
        jti TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        auto_enable INTEGER NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL,
        description TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        admin_state TEXT NOT NULL,          -- pending | enabled | disabled
        configured_role TEXT NOT NULL,      -- what the agent reports
        role_override TEXT,                 -- set by an admin, wins when present
        role_limit TEXT NOT NULL,           -- the widest role its join token allowed
        status TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        status_since REAL NOT NULL,
        enrolled_at REAL NOT NULL,
        last_checkin REAL,
        address TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        report TEXT NOT NULL DEFAULT '{}',
        token_jti TEXT NOT NULL,
        cert_serial TEXT NOT NULL,
        cert_not_after REAL NOT NULL,
        prev_cert_serial TEXT,              -- accepted until the renewed one is first used
        libvirt_cert_serial TEXT,
        libvirt_cert_not_after REAL,
        libvirt_cert_address TEXT          -- the address its libvirtd certificate names
    );
    CREATE UNIQUE INDEX hosts_cert_serial ON hosts(cert_serial);
    CREATE TABLE host_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        status TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX host_events_host ON host_events(host_id, seq);
    """,
    # 2: every libvirtd certificate issued, so that forgetting a host can revoke all of
    # them (a renewed host still holds its older, unexpired ones).
    """
    CREATE TABLE libvirt_certs (
        serial TEXT PRIMARY KEY,
        host_id TEXT NOT NULL,
        not_after REAL NOT NULL,
        revoked_at REAL
    );
    INSERT INTO libvirt_certs(serial, host_id, not_after)
        SELECT libvirt_cert_serial, id, libvirt_cert_not_after FROM hosts
        WHERE libvirt_cert_serial IS NOT NULL;
    """,
    # 3: every check-in looks its host up by certificate serial, the current or the
    # previous one: without this index that was a scan of all hosts (profiled: 40 % of
    # the server's time with 3,000 hosts).
    """
    CREATE INDEX hosts_prev_cert_serial ON hosts(prev_cert_serial);
    """,
    # 4: the offline sweep and the status counts, every second, read only this covering
    # index instead of every host's row with its report (22 ms -> 6 ms at 10,000 hosts).
    """
    CREATE INDEX hosts_liveness ON hosts(admin_state, status, last_checkin, enrolled_at, id);
    """,
    # 5: the server checks each libvirtd certificate itself (the previous one is accepted
    # until the renewed one is served); whether libvirtd answered is kept apart so a
    # check-in need not parse the stored report; a history row counts its repeats.
    """
    ALTER TABLE hosts ADD COLUMN prev_libvirt_cert_serial TEXT;
    ALTER TABLE hosts ADD COLUMN libvirtd_ok INTEGER NOT NULL DEFAULT 0;
    UPDATE hosts SET libvirtd_ok = COALESCE(json_extract(report, '$.libvirtd.ok'), 0);
    ALTER TABLE host_events ADD COLUMN tries INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE host_events ADD COLUMN last_at REAL;
    """,
    # 6: a heartbeat carries the digest of the host's last report, compared with this
    # (computed when the report arrives; an empty one asks the agent for its report).
    """
    ALTER TABLE hosts ADD COLUMN report_digest TEXT NOT NULL DEFAULT '';
    """,
    # 7: the audit log (server/audit.py).
    """
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        host_id TEXT NOT NULL DEFAULT '',
        address TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_at ON audit(at);
    CREATE INDEX audit_host ON audit(host_id, at);
    """,
    # 8: the web page's one-time login URLs and its sessions (server/websessions.py), each
    # by its secret's SHA-256: the database never holds a secret a browser presents.
    """
    CREATE TABLE web_logins (
        digest TEXT PRIMARY KEY,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL
    );
    CREATE TABLE web_sessions (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        address TEXT NOT NULL DEFAULT '',
        user_agent TEXT NOT NULL DEFAULT '',
        revoked_at REAL
    );
    """,
    # 9: how the server reaches each host's libvirtd (wire.TRANSPORTS), chosen by its
    # token and changed by `hosts set-transport`; tokens and hosts from before dialled.
    """
    ALTER TABLE tokens ADD COLUMN transport TEXT NOT NULL DEFAULT 'direct';
    ALTER TABLE hosts ADD COLUMN transport TEXT NOT NULL DEFAULT 'direct';
    """,
]

# PostgreSQL started at SQLite's schema version 9: its first migration makes that shape
# at once, plus what only replicas share (the CAs' and the token-signing keys).
# Times are seconds since the epoch in DOUBLE PRECISION (REAL is 4 bytes there).
POSTGRES_MIGRATIONS = [
    # 1
    """
    CREATE TABLE tokens (
        jti TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        auto_enable BOOLEAN NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        description TEXT NOT NULL DEFAULT '',
        transport TEXT NOT NULL DEFAULT 'direct'
    );
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        admin_state TEXT NOT NULL,
        configured_role TEXT NOT NULL,
        role_override TEXT,
        role_limit TEXT NOT NULL,
        status TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        status_since DOUBLE PRECISION NOT NULL,
        enrolled_at DOUBLE PRECISION NOT NULL,
        last_checkin DOUBLE PRECISION,
        address TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        report TEXT NOT NULL DEFAULT '{}',
        token_jti TEXT NOT NULL,
        cert_serial TEXT NOT NULL,
        cert_not_after DOUBLE PRECISION NOT NULL,
        prev_cert_serial TEXT,
        libvirt_cert_serial TEXT,
        libvirt_cert_not_after DOUBLE PRECISION,
        libvirt_cert_address TEXT,
        prev_libvirt_cert_serial TEXT,
        libvirtd_ok BOOLEAN NOT NULL DEFAULT FALSE,
        report_digest TEXT NOT NULL DEFAULT '',
        transport TEXT NOT NULL DEFAULT 'direct'
    );
    CREATE UNIQUE INDEX hosts_cert_serial ON hosts(cert_serial);
    CREATE INDEX hosts_prev_cert_serial ON hosts(prev_cert_serial);
    CREATE INDEX hosts_liveness ON hosts(admin_state, status, last_checkin, enrolled_at, id);
    CREATE TABLE host_events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        at DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL,
        detail TEXT NOT NULL,
        tries INTEGER NOT NULL DEFAULT 1,
        last_at DOUBLE PRECISION
    );
    CREATE INDEX host_events_host ON host_events(host_id, seq);
    CREATE TABLE libvirt_certs (
        serial TEXT PRIMARY KEY,
        host_id TEXT NOT NULL,
        not_after DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE TABLE audit (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        host_id TEXT NOT NULL DEFAULT '',
        address TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_at ON audit(at);
    CREATE INDEX audit_host ON audit(host_id, at);
    CREATE TABLE web_logins (
        digest TEXT PRIMARY KEY,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION
    );
    CREATE TABLE web_sessions (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        address TEXT NOT NULL DEFAULT '',
        user_agent TEXT NOT NULL DEFAULT '',
        revoked_at DOUBLE PRECISION
    );
    -- what every replica must hold alike: the CAs and the token-signing key, as PEM
    CREATE TABLE key_material (
        name TEXT PRIMARY KEY,
        pem BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: replicas and who owns each enabled host's connection (server/replicas.py).
    """
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL      -- the database's clock, every lease round
    );
    CREATE TABLE leases (
        host_id TEXT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        owner TEXT NOT NULL,
        epoch BIGINT NOT NULL,                 -- one higher at each new owner: the fence
        expires_at DOUBLE PRECISION NOT NULL   -- the database's clock
    );
    CREATE INDEX leases_owner ON leases(owner);
    CREATE TABLE replica_tunnels (
        host_id TEXT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        replica TEXT NOT NULL
    );
    """,
    # 3: every change to a host's row is announced (LISTEN virtfleet_hosts), so that each
    # replica can keep the rows it reads and drop one another replica changed.
    """
    CREATE FUNCTION virtfleet_host_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('virtfleet_hosts', OLD.id);
        ELSE
            PERFORM pg_notify('virtfleet_hosts', NEW.id);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER hosts_changed AFTER INSERT OR UPDATE OR DELETE ON hosts
        FOR EACH ROW EXECUTE FUNCTION virtfleet_host_changed();
    """,
]
