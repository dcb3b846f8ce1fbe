//! The config stream between the operator and its sidecars: a contract of its own, versioned
//! apart from the types either end keeps inside, so that an operator and the sidecars of the
//! previous release understand each other through a `helm upgrade` (app pods, and so their
//! sidecars, outlive operator upgrades).
//!
//! One HTTP/2 request per sidecar, `POST /v1/stream`, over TLS, full duplex and long-lived:
//!
//! - **Request headers**: `authorization: Bearer TOKEN`, the pod's projected ServiceAccount
//!   token (audience `backstop`); `x-backstop-protocol: N` ([`Protocol`]); and, on a reconnect,
//!   `x-backstop-version: V`, the configuration version the sidecar serves.
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
//!   the fleet view is made of, and what its spend-limited targets cost, and at least one every
//!   [`HEARTBEAT`].
//!
//! The versions differ only in how a configuration carries its policies: protocol 1 (Backstop
//! 0.1, [`v1`]) sends the compiled policies themselves; protocol 2 ([`v2`]) sends each policy's
//! spec and the keys it names, which the sidecar compiles with its own compiler, and names the
//! policies a sidecar is to keep its own copy of. A sidecar asks for 2 and falls back to 1 when
//! an operator of the previous release refuses it; an operator serves both. Within a version
//! fields are added, never renamed or removed: unknown fields are ignored and new ones have
//! defaults. Golden fixtures (`tests/fixtures/configstream/`) pin the encodings; changing them
//! on purpose means a new fixture and, for a change an older peer cannot read, a new version.
//!
//! Either end calls the stream dead after [`STREAM_IDLE`] without a message. What a sidecar
//! sends is bounded tightly ([`MAX_REPORT_BYTES`], [`MAX_REPORT_TARGETS`], [`MAX_REASON_BYTES`]):
//! any pod can mount a token for the `backstop` audience, and no pod may hurt the others.

pub mod v1;
pub mod v2;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A version of the stream's contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// Backstop 0.1: compiled policies on the wire.
    V1,
    /// Policy specs and keys on the wire; held policies.
    V2,
}

impl Protocol {
    /// The newest version, which a sidecar asks for first.
    pub const NEWEST: Protocol = Protocol::V2;

    /// The version a header names, if this release speaks it.
    pub fn from_header(value: &str) -> Option<Protocol> {
        match value.trim() {
            "1" => Some(Protocol::V1),
            "2" => Some(Protocol::V2),
            _ => None,
        }
    }

    /// As the header carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V1 => "1",
            Protocol::V2 => "2",
        }
    }

    /// The version before this one, if there is one this release still speaks.
    pub fn previous(self) -> Option<Protocol> {
        match self {
            Protocol::V2 => Some(Protocol::V1),
            Protocol::V1 => None,
        }
    }
}

/// The stream's path.
pub const STREAM_PATH: &str = "/v1/stream";
/// The header with the protocol version.
pub const PROTOCOL_HEADER: &str = "x-backstop-protocol";
/// The header with the version a reconnecting sidecar serves.
pub const VERSION_HEADER: &str = "x-backstop-version";
/// The header with what a sidecar does beyond its protocol version, comma-separated: `verify`,
/// it sends the verification probes [`Fleet::verify`] orders. An operator orders probes only
/// from sidecars that say so (a sidecar of an earlier release would ignore the order).
pub const FEATURES_HEADER: &str = "x-backstop-features";
/// The feature of a sidecar that sends verification probes.
pub const FEATURE_VERIFY: &str = "verify";
/// How often either end sends something on an otherwise quiet stream.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long either end waits for a message before it calls the stream dead.
pub const STREAM_IDLE: Duration = Duration::from_secs(35);
/// How often a sidecar reports what its targets did.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The largest message a sidecar reads: a configuration of every policy selecting its pod.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// The largest report an operator reads from a sidecar; a longer one ends its stream.
pub const MAX_REPORT_BYTES: usize = 64 << 10;
/// The most targets one report may carry; a report with more ends its stream.
pub const MAX_REPORT_TARGETS: usize = 256;
/// The most verification results a sidecar puts in one report, so that a report of them all
/// stays well within [`MAX_REPORT_BYTES`].
pub const MAX_REPORT_RESULTS: usize = 64;
/// The longest reason (a refusal, a target's last failure) kept from a sidecar.
pub const MAX_REASON_BYTES: usize = 256;

/// `text` cut to at most [`MAX_REASON_BYTES`], on a character boundary, marked when cut.
pub fn bounded_reason(text: &str) -> String {
    if text.len() <= MAX_REASON_BYTES {
        return text.to_string();
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A message on the stream, operator to sidecar; `C` is the configuration of the protocol
/// version ([`v1::Config`], [`v2::Config`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage<C> {
    /// The pod's configuration: every policy of its namespace whose selector matches it.
    Config(C),
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

/// The fleet's decisions on the targets of a pod's policies, by target identity; targets it
/// has nothing to say about are left to the pod's own breakers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    /// The decisions.
    pub targets: BTreeMap<String, FleetTarget>,
    /// The spend-limited targets whose current window the fleet has spent, by spend key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spent: BTreeMap<String, WindowSpend>,
    /// Verification probes the operator chose this pod to send, by target identity. An order
    /// stays until its result is reported; a sidecar sends each order (by `id`) once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub verify: BTreeMap<String, VerifyOrder>,
}

/// One verification probe to send: a small real request to a target, through its own
/// translation and key, which counts for nothing but its result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyOrder {
    /// Names this order; the result carries it back.
    pub id: u64,
    /// The probe's one user message.
    pub prompt: String,
    /// The most tokens its answer may have.
    pub max_tokens: u32,
    /// How long it may take, in milliseconds.
    pub timeout_ms: u64,
}

/// How a verification probe ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResult {
    /// The order's id.
    pub id: u64,
    /// Whether the target answered.
    pub passed: bool,
    /// Why not, as a failure class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Why not, in a line (never an authentication error's body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long it took, in milliseconds.
    pub latency_ms: u64,
}

/// What a target cost in one window of its `spendLimit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowSpend {
    /// The window: the Unix time in ms divided by the window's length (windows are aligned to
    /// the epoch, so every pod and the operator agree on them).
    pub window: i64,
    /// US dollars.
    pub usd: f64,
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
    /// A configuration the sidecar refused, whole or in part, and why (it keeps serving what it
    /// had of what it refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejected>,
    /// What each fleet-scoped target did since the last report, by target identity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, TargetReport>,
    /// What each spend-limited target has cost this pod in its current window, by spend key:
    /// the whole, every time, so that a restarted operator has the sum again at once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spend: BTreeMap<String, WindowSpend>,
    /// The verification probes this pod sent since its last report, by target identity (at most
    /// [`MAX_REPORT_RESULTS`] in one report; more wait for the next).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub verified: BTreeMap<String, VerifyResult>,
}

/// A configuration a sidecar refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Its version.
    pub version: String,
    /// Why.
    pub reason: String,
    /// The policies it could not take, by name, when it took the others (protocol 2); empty:
    /// the whole configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
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
    /// Of `failures`, those after the report's last success: the failures in a row it ends
    /// with. Absent from sidecars before it, which the operator reads as none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub trailing_failures: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Report {
    /// Whether the report stays within what a sidecar may send; `Err` says what it exceeds.
    pub fn check_bounds(&self) -> Result<(), &'static str> {
        if self.targets.len() > MAX_REPORT_TARGETS
            || self.spend.len() > MAX_REPORT_TARGETS
            || self.verified.len() > MAX_REPORT_TARGETS
        {
            return Err("a report named more targets than the protocol allows");
        }
        if self.spend.values().any(|s| !(s.usd.is_finite() && s.usd >= 0.0)) {
            return Err("a report's spend was not an amount");
        }
        Ok(())
    }

    /// Cuts every free-text field to [`MAX_REASON_BYTES`]: what the operator keeps, logs,
    /// writes into status and Events and sends to other sidecars.
    pub fn bound_reasons(&mut self) {
        if let Some(rejected) = &mut self.rejected {
            rejected.reason = bounded_reason(&rejected.reason);
            rejected.policies.truncate(MAX_REPORT_TARGETS);
        }
        for target in self.targets.values_mut() {
            if let Some(failure) = &mut target.last_failure {
                *failure = bounded_reason(failure);
            }
        }
        for result in self.verified.values_mut() {
            for text in [&mut result.class, &mut result.message].into_iter().flatten() {
                *text = bounded_reason(text);
            }
        }
    }
}

/// One message as a line of the stream.
pub fn line(message: &impl Serialize) -> bytes::Bytes {
    let mut text = serde_json::to_vec(message).unwrap_or_default();
    text.push(b'\n');
    text.into()
}

/// Splits a byte stream into lines of at most `limit` bytes.
#[derive(Debug)]
pub struct Lines {
    buffer: Vec<u8>,
    limit: usize,
}

/// A line longer than the limit.
#[derive(Debug, thiserror::Error)]
#[error("a message longer than {0} bytes")]
pub struct TooLong(pub usize);

impl Lines {
    /// Lines of at most `limit` bytes.
    pub fn new(limit: usize) -> Lines {
        Lines { buffer: Vec::new(), limit }
    }

    /// Adds `chunk`; returns the lines it completed, without their newlines (empty ones
    /// skipped).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, TooLong> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            if self.buffer.len() + end > self.limit {
                return Err(TooLong(self.limit));
            }
            self.buffer.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let line = std::mem::take(&mut self.buffer);
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        if self.buffer.len() + rest.len() > self.limit {
            return Err(TooLong(self.limit));
        }
        self.buffer.extend_from_slice(rest);
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_tolerate_what_a_newer_release_adds() {
        let fleet: ServerMessage<v2::Config> = ServerMessage::Fleet(Fleet {
            targets: BTreeMap::from([(
                "t".into(),
                FleetTarget::Open { retry_in_ms: 5000, reason: "429 with Retry-After".into() },
            )]),
            spent: BTreeMap::from([("shop/chat\u{1f}claude/opus".into(), WindowSpend { window: 493_000, usd: 50.25 })]),
            verify: BTreeMap::new(),
        });
        let text = line(&fleet);
        assert!(text.ends_with(b"\n"));
        assert_eq!(serde_json::from_slice::<ServerMessage<v2::Config>>(&text).expect("parses"), fleet);
        let newer = r#"{"type":"heartbeat","sentAt":"later"}"#;
        assert_eq!(serde_json::from_str::<ServerMessage<v2::Config>>(newer).expect("parses"), ServerMessage::Heartbeat);
        let report: Report = serde_json::from_str(r#"{"applied":"v1","futureField":1}"#).expect("parses");
        assert_eq!(report.applied.as_deref(), Some("v1"));
    }

    #[test]
    fn lines_are_split_across_chunks_and_bounded() {
        let mut lines = Lines::new(MAX_REPORT_BYTES);
        assert!(lines.push(b"{\"a\"").expect("short").is_empty());
        assert_eq!(lines.push(b":1}\n\n{\"b\":2}\n{").expect("short"), [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        let huge = vec![b'x'; MAX_REPORT_BYTES + 1];
        assert!(lines.push(&huge).is_err(), "a line that never ends is cut off, not buffered forever");
        let mut lines = Lines::new(8);
        assert!(lines.push(b"123456789\n").is_err(), "a whole line over the limit in one chunk");
    }

    #[test]
    fn what_a_sidecar_sends_is_bounded() {
        let long = "é".repeat(1000);
        let cut = bounded_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(bounded_reason("short"), "short");
        let mut report = Report {
            rejected: Some(Rejected { version: "v".into(), reason: long.clone(), policies: Vec::new() }),
            targets: BTreeMap::from([(
                "t".into(),
                TargetReport { failures: 1, last_failure: Some(long.clone()), ..TargetReport::default() },
            )]),
            ..Report::default()
        };
        report.bound_reasons();
        assert!(report.rejected.as_ref().is_some_and(|r| r.reason.len() <= MAX_REASON_BYTES));
        assert!(report.targets["t"].last_failure.as_ref().is_some_and(|f| f.len() <= MAX_REASON_BYTES));
        assert!(report.check_bounds().is_ok());
        report.targets = (0..=MAX_REPORT_TARGETS).map(|i| (i.to_string(), TargetReport::default())).collect();
        assert!(report.check_bounds().is_err());
        assert_eq!(Protocol::from_header("2"), Some(Protocol::V2));
        assert_eq!(Protocol::from_header("3"), None);
        assert_eq!(Protocol::NEWEST.previous(), Some(Protocol::V1));
    }
}

/// Golden encodings of the contract: the messages each protocol version puts on the wire,
/// recorded in `tests/fixtures/configstream/`. A change that alters them fails here; changing
/// them on purpose means recording them again (`BACKSTOP_RECORD=1 cargo test golden`) and, for a
/// change an older peer cannot read, a new protocol version.
#[cfg(test)]
mod golden {
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;
    use crate::testing::{CLUSTER_POLICY, DEMO_POLICY, compiled, served};

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configstream").join(name)
    }

    fn pinned(name: &str, message: &Value) {
        let path = fixture(name);
        if std::env::var_os("BACKSTOP_RECORD").is_some() {
            let text = serde_json::to_string_pretty(message).expect("json") + "\n";
            std::fs::write(&path, text).expect("record the fixture");
        }
        let recorded: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; record it with BACKSTOP_RECORD=1", path.display())),
        )
        .expect("fixture JSON");
        assert_eq!(
            message, &recorded,
            "the encoding of {name} changed: a protocol change for every peer of another release"
        );
    }

    fn v1_config() -> v1::Config {
        v1::Config::new("shop", "web-1", vec![compiled(DEMO_POLICY)])
    }

    fn v2_config() -> v2::Config {
        let chat = served("chat", CLUSTER_POLICY);
        v2::Config {
            version: v2::Config::version_of([("chat", chat.version.as_str())], &["held".to_string()]),
            namespace: "shop".into(),
            pod: "web-1".into(),
            policies: vec![chat.wire],
            held: vec!["held".into()],
            note: None,
        }
    }

    #[test]
    fn protocol_1_is_encoded_as_the_previous_release_reads_it() {
        let message = serde_json::to_value(ServerMessage::Config(v1_config())).expect("json");
        pinned("v1-config.json", &message);
    }

    #[test]
    fn protocol_2_is_encoded_as_recorded() {
        let message = serde_json::to_value(ServerMessage::Config(v2_config())).expect("json");
        pinned("v2-config.json", &message);
        let fleet = ServerMessage::<v2::Config>::Fleet(Fleet {
            targets: BTreeMap::from([
                ("a".to_string(), FleetTarget::Open { retry_in_ms: 5000, reason: "429".into() }),
                ("b".to_string(), FleetTarget::HalfOpen { probe: true, reason: "5xx".into() }),
            ]),
            spent: BTreeMap::new(),
            verify: BTreeMap::new(),
        });
        pinned("fleet.json", &serde_json::to_value(fleet).expect("json"));
        // Spend limits came later: fields an older peer ignores, absent when unused.
        let spent = ServerMessage::<v2::Config>::Fleet(Fleet {
            targets: BTreeMap::new(),
            spent: BTreeMap::from([("shop/chat\u{1f}claude/opus".into(), WindowSpend { window: 493_000, usd: 50.25 })]),
            verify: BTreeMap::new(),
        });
        pinned("fleet-spent.json", &serde_json::to_value(spent).expect("json"));
        let spending = Report {
            applied: Some("v".into()),
            spend: BTreeMap::from([(
                "shop/chat\u{1f}claude/opus".into(),
                WindowSpend { window: 493_000, usd: 0.0125 },
            )]),
            ..Report::default()
        };
        pinned("report-spend.json", &serde_json::to_value(spending).expect("json"));
        // Verification came later still: absent when unused, as above.
        let order = ServerMessage::<v2::Config>::Fleet(Fleet {
            verify: BTreeMap::from([(
                "b".into(),
                VerifyOrder { id: 7, prompt: "Reply with OK.".into(), max_tokens: 1, timeout_ms: 30_000 },
            )]),
            ..Fleet::default()
        });
        pinned("fleet-verify.json", &serde_json::to_value(order).expect("json"));
        let verified = Report {
            verified: BTreeMap::from([
                ("a".into(), VerifyResult { id: 6, passed: true, class: None, message: None, latency_ms: 412 }),
                (
                    "b".into(),
                    VerifyResult {
                        id: 7,
                        passed: false,
                        class: Some("authError".into()),
                        message: Some("401 from the provider".into()),
                        latency_ms: 35,
                    },
                ),
            ]),
            ..Report::default()
        };
        pinned("report-verified.json", &serde_json::to_value(verified).expect("json"));
        let report = Report {
            applied: Some("v".into()),
            rejected: Some(Rejected { version: "w".into(), reason: "why".into(), policies: vec!["p".into()] }),
            targets: BTreeMap::from([(
                "a".to_string(),
                TargetReport {
                    successes: 1,
                    failures: 2,
                    retry_after_ms: Some(3),
                    last_failure: Some("x".into()),
                    trailing_failures: 0,
                },
            )]),
            spend: BTreeMap::new(),
            verified: BTreeMap::new(),
        };
        pinned("report.json", &serde_json::to_value(report).expect("json"));
    }

    #[test]
    fn recorded_messages_of_both_versions_read_back_into_what_a_sidecar_serves() {
        let read = |name: &str| std::fs::read(fixture(name)).expect("fixture");
        let Ok(ServerMessage::Config(old)) =
            serde_json::from_slice::<ServerMessage<v1::Config>>(&read("v1-config.json"))
        else {
            panic!("a protocol-1 configuration")
        };
        assert_eq!(old.policies, vec![compiled(DEMO_POLICY)], "the previous release's policies, as compiled here");
        let Ok(ServerMessage::Config(new)) =
            serde_json::from_slice::<ServerMessage<v2::Config>>(&read("v2-config.json"))
        else {
            panic!("a protocol-2 configuration")
        };
        let compiled_here = new.policies[0].compile(&new.namespace).expect("compiles");
        assert_eq!(
            compiled_here,
            served("chat", CLUSTER_POLICY).compiled,
            "the sidecar compiles what the operator did"
        );
        assert_eq!(new.held, ["held"]);
    }
}
