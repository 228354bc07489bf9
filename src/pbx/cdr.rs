//! Call detail records: what the call history keeps about each call.

use std::fmt;

use crate::media::LegReport;
use crate::sip::transport::Transport;
use crate::srtp::Suite;

/// How a call ended, as the call history shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    /// Every device of the callee was busy (486/600).
    Busy,
    /// Nobody answered before the ring timeout (408/480 after ringing).
    NoAnswer,
    /// The caller hung up while it rang (487).
    Cancelled,
    /// The callee declined (603).
    Declined,
    /// No such number (404).
    NotFound,
    /// The callee has no registered device (480).
    Unavailable,
    /// Refused for policy or media reasons (403, 488).
    Rejected,
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Answered,
        Outcome::Busy,
        Outcome::NoAnswer,
        Outcome::Cancelled,
        Outcome::Declined,
        Outcome::NotFound,
        Outcome::Unavailable,
        Outcome::Rejected,
        Outcome::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Busy => "busy",
            Outcome::NoAnswer => "no-answer",
            Outcome::Cancelled => "cancelled",
            Outcome::Declined => "declined",
            Outcome::NotFound => "not-found",
            Outcome::Unavailable => "unavailable",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side ended an answered call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    Caller,
    Callee,
    /// Parley ended it (media stopped, shutdown).
    Parley,
}

impl EndedBy {
    pub const fn as_str(self) -> &'static str {
        match self {
            EndedBy::Caller => "caller",
            EndedBy::Callee => "callee",
            EndedBy::Parley => "parley",
        }
    }

    pub fn parse(s: &str) -> Option<EndedBy> {
        [EndedBy::Caller, EndedBy::Callee, EndedBy::Parley]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// One leg of a call as the history records it.
#[derive(Debug, Clone, PartialEq)]
pub struct LegRecord {
    pub transport: Transport,
    /// The negotiated TLS version (`TLSv1.3`), on TLS legs.
    pub tls_version: Option<String>,
    /// The SRTP suite, or `None` for plain RTP.
    pub srtp: Option<Suite>,
    pub media: Option<LegReport>,
}

/// One row of the call history.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub call_ref: String,
    pub caller: String,
    pub callee: String,
    pub started_unix_ms: i64,
    pub answered_unix_ms: Option<i64>,
    pub ended_unix_ms: i64,
    pub outcome: Outcome,
    pub sip_status: u16,
    pub sip_reason: String,
    pub ended_by: Option<EndedBy>,
    pub caller_leg: LegRecord,
    pub callee_leg: Option<LegRecord>,
}

impl CallRecord {
    /// Talk time: from answer to hang-up.
    pub fn duration_ms(&self) -> i64 {
        self.answered_unix_ms
            .map_or(0, |a| (self.ended_unix_ms - a).max(0))
    }
}

/// A leg's media statistics as the JSON the history stores.
pub fn media_json(report: &LegReport) -> serde_json::Value {
    serde_json::json!({
        "remote": report.remote.map(|a| a.to_string()),
        "received": {
            "packets": report.received_packets,
            "bytes": report.received_bytes,
            "lost": report.lost,
            "jitter_ms": round2(report.jitter_ms),
            "auth_failures": report.auth_failures,
            "rtcp_auth_failures": report.rtcp_auth_failures,
            "replays": report.replays,
            "wrong_source": report.wrong_source,
            "mos": report.mos_received.map(round2),
        },
        "sent": {
            "packets": report.sent_packets,
            "bytes": report.sent_bytes,
            "remote_fraction_lost": report.remote_fraction_lost.map(round2),
            "remote_jitter_ms": report.remote_jitter_ms.map(round2),
            "mos": report.mos_sent.map(round2),
        },
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
