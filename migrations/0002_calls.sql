-- Call history: one row per call, written when the call ends.

CREATE TABLE calls (
    id            INTEGER PRIMARY KEY,
    -- Parley's own id for the call, shown in logs.
    call_ref      TEXT NOT NULL UNIQUE,
    caller        TEXT NOT NULL,
    callee        TEXT NOT NULL,
    -- Unix milliseconds.
    started_at    INTEGER NOT NULL,
    answered_at   INTEGER,
    ended_at      INTEGER NOT NULL,
    duration_ms   INTEGER NOT NULL CHECK (duration_ms >= 0),
    outcome       TEXT NOT NULL CHECK (outcome IN
                    ('answered', 'busy', 'no-answer', 'cancelled', 'declined',
                     'not-found', 'unavailable', 'rejected', 'failed')),
    -- The final SIP status the caller got (200 for answered calls) and
    -- who ended an answered call.
    sip_status    INTEGER NOT NULL,
    sip_reason    TEXT NOT NULL,
    ended_by      TEXT CHECK (ended_by IS NULL OR ended_by IN ('caller', 'callee', 'parley')),
    -- Per leg: how it was carried, and its media statistics (JSON: packets,
    -- bytes, loss, jitter and MOS each way).
    caller_transport TEXT NOT NULL CHECK (caller_transport IN ('udp', 'tcp', 'tls')),
    caller_tls       TEXT,
    caller_srtp      TEXT,
    caller_media     TEXT,
    callee_transport TEXT CHECK (callee_transport IS NULL OR callee_transport IN ('udp', 'tcp', 'tls')),
    callee_tls       TEXT,
    callee_srtp      TEXT,
    callee_media     TEXT
);

CREATE INDEX calls_started ON calls (started_at DESC);
