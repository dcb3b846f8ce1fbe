//! The config stream between the operator and its sidecars: what goes over the wire.
//!
//! One HTTP/2 request per sidecar, `POST /v1/stream`, over TLS, full duplex and long-lived:
//!
//! - **Request headers**: `authorization: Bearer TOKEN`, the pod's projected ServiceAccount
//!   token (audience `backstop`); `x-backstop-protocol: 1` ([`PROTOCOL`]); and, on a
//!   reconnect, `x-backstop-version: V`, the configuration version the sidecar serves.
//! - **Response body**, operator to sidecar: newline-delimited JSON [`ServerMessage`]s. First
//!   the pod's configuration ([`ServerMessage::Config`]), or [`ServerMessage::Unchanged`] when
//!   the sidecar already serves that version, so a reconnect resumes without a resend; then one
//!   message per change: a new configuration, the fleet's view of target health
//!   ([`ServerMessage::Fleet`], always whole, so it is idempotent); a heartbeat every
//!   [`HEARTBEAT`] while nothing changes; and [`ServerMessage::Goodbye`] when the operator ends
//!   the stream (its token expires, a newer stream of the same pod replaced it, shutdown).
//! - **Request body**, sidecar to operator: newline-delimited [`Report`]s. One at once after
//!   each configuration, acknowledging the version applied or rejecting it with a reason; then
//!   one every [`REPORT_EVERY`] carrying what the pod's fleet-scoped targets did, the evidence
//!   the fleet view is made of, and at least one every [`HEARTBEAT`].
//!
//! Either end calls the stream dead after [`STREAM_IDLE`] without a message. Messages are
//! bounded by [`MAX_MESSAGE_BYTES`]. Fields are added, never renamed or removed, within a
//! protocol version: unknown fields are ignored and new ones have defaults, so a sidecar and an
//! operator of neighbouring releases understand each other.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chain::CompiledPolicy;

/// The protocol's version, sent by the sidecar as `x-backstop-protocol`.
pub const PROTOCOL: &str = "1";
/// The stream's path.
pub const STREAM_PATH: &str = "/v1/stream";
/// The header with the protocol version.
pub const PROTOCOL_HEADER: &str = "x-backstop-protocol";
/// The header with the version a reconnecting sidecar serves.
pub const VERSION_HEADER: &str = "x-backstop-version";
/// How often either end sends something on an otherwise quiet stream.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long either end waits for a message before it calls the stream dead.
pub const STREAM_IDLE: Duration = Duration::from_secs(35);
/// How often a sidecar reports what its targets did.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The largest message either end reads.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// A message on the stream, operator to sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// The pod's configuration: every policy of its namespace whose selector matches it.
    Config(Config),
    /// The sidecar already serves this version.
    Unchanged {
        /// The version.
        version: String,
    },
    /// The fleet's view of the targets of the pod's policies.
    Fleet(Fleet),
    /// Nothing changed; the stream is alive.
    Heartbeat,
    /// The operator ends the stream; the sidecar reconnects.
    Goodbye {
        /// Why.
        reason: String,
    },
}

/// A pod's configuration, versioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// A digest of the policies below: what the sidecar acknowledges.
    pub version: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name, as the operator authenticated it.
    pub pod: String,
    /// The policies, in name order; keys resolved.
    pub policies: Vec<CompiledPolicy>,
}

impl Config {
    /// A pod's configuration of `policies` (in name order).
    pub fn new(namespace: &str, pod: &str, policies: Vec<CompiledPolicy>) -> Config {
        Config { version: Config::version_of(&policies), namespace: namespace.into(), pod: pod.into(), policies }
    }

    /// The version of a set of policies: a digest of their names and contents.
    pub fn version_of(policies: &[CompiledPolicy]) -> String {
        let text: Vec<String> = policies.iter().map(|p| format!("{}={}", p.source, p.digest())).collect();
        let digest = ring::digest::digest(&ring::digest::SHA256, text.join("\n").as_bytes());
        digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What a sidecar serves when no policy selects its pod.
    pub fn empty_note(&self) -> String {
        format!("no FallbackPolicy in namespace `{}` selects pod `{}`", self.namespace, self.pod)
    }
}

/// The fleet's decisions on the targets of a pod's policies, by target identity; targets it
/// has nothing to say about are left to the pod's own breakers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    /// The decisions.
    pub targets: BTreeMap<String, FleetTarget>,
}

/// The fleet's decision on one target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum FleetTarget {
    /// Out for every pod, for this long from when the message was sent.
    #[serde(rename_all = "camelCase")]
    Open {
        /// How long it stays out, in milliseconds from the message.
        retry_in_ms: u64,
        /// Why, for `/health` and logs.
        reason: String,
    },
    /// Recovering: only the pods the operator chose send it probes; the rest keep it out.
    #[serde(rename_all = "camelCase")]
    HalfOpen {
        /// Whether this pod is one of the probers.
        probe: bool,
        /// Why it was open.
        reason: String,
    },
}

/// A sidecar's message: acknowledgement and evidence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The configuration version the sidecar serves, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<String>,
    /// A configuration the sidecar refused, and why (it keeps serving `applied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejected>,
    /// What each fleet-scoped target did since the last report, by target identity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, TargetReport>,
}

/// A configuration a sidecar refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Its version.
    pub version: String,
    /// Why.
    pub reason: String,
}

/// What one target did at one sidecar since its last report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetReport {
    /// Requests that succeeded.
    #[serde(default)]
    pub successes: u64,
    /// Requests that failed in a way that counts against the target.
    #[serde(default)]
    pub failures: u64,
    /// The longest wait a provider asked for (`Retry-After` on a 429 or 503), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The last counted failure, as `class: message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// One message as a line of the stream.
pub fn line(message: &impl Serialize) -> bytes::Bytes {
    let mut text = serde_json::to_vec(message).unwrap_or_default();
    text.push(b'\n');
    text.into()
}

/// Splits a byte stream into lines of at most [`MAX_MESSAGE_BYTES`].
#[derive(Debug, Default)]
pub struct Lines {
    buffer: Vec<u8>,
}

/// A line longer than [`MAX_MESSAGE_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("a message longer than {MAX_MESSAGE_BYTES} bytes")]
pub struct TooLong;

impl Lines {
    /// Adds `chunk`; returns the lines it completed, without their newlines (empty ones
    /// skipped).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, TooLong> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.buffer.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let line = std::mem::take(&mut self.buffer);
            if line.len() > MAX_MESSAGE_BYTES {
                return Err(TooLong);
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        self.buffer.extend_from_slice(rest);
        if self.buffer.len() > MAX_MESSAGE_BYTES {
            return Err(TooLong);
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_tolerate_what_a_newer_release_adds() {
        let fleet = ServerMessage::Fleet(Fleet {
            targets: BTreeMap::from([(
                "t".into(),
                FleetTarget::Open { retry_in_ms: 5000, reason: "429 with Retry-After".into() },
            )]),
        });
        let text = line(&fleet);
        assert!(text.ends_with(b"\n"));
        assert_eq!(serde_json::from_slice::<ServerMessage>(&text).expect("parses"), fleet);
        let newer = r#"{"type":"heartbeat","sentAt":"later"}"#;
        assert_eq!(serde_json::from_str::<ServerMessage>(newer).expect("parses"), ServerMessage::Heartbeat);
        let report: Report = serde_json::from_str(r#"{"applied":"v1","futureField":1}"#).expect("parses");
        assert_eq!(report.applied.as_deref(), Some("v1"));
    }

    #[test]
    fn lines_are_split_across_chunks_and_bounded() {
        let mut lines = Lines::default();
        assert!(lines.push(b"{\"a\"").expect("short").is_empty());
        assert_eq!(lines.push(b":1}\n\n{\"b\":2}\n{").expect("short"), [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        let huge = vec![b'x'; MAX_MESSAGE_BYTES + 1];
        assert!(lines.push(&huge).is_err(), "a line that never ends is cut off, not buffered forever");
    }
}
