//! Defaults for the settings a policy leaves out. The CRD's field docs name the same values;
//! `kubectl explain` is where users read them.

use std::time::Duration;

/// Attempts per target, the first included.
pub const RETRY_ATTEMPTS: u32 = 2;
/// The first retry's backoff.
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// The longest backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A non-streamed answer: the OpenAI and Anthropic SDKs' own 10 minutes.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// A stream's first progress (content or thinking): room for a minute of silent reasoning.
pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest gap between two events of a stream that has shown progress.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Finding a target that answers.
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(900);
/// Extra attempts a route may add, as a percentage of its requests.
pub const BUDGET_PERCENT: u32 = 20;
/// Extra attempts always allowed per second.
pub const MIN_RETRIES_PER_SECOND: u32 = 10;
/// The retry budget's window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Attempts per request across every target.
pub const MAX_REQUEST_ATTEMPTS: u32 = 6;
/// Consecutive failures that open a breaker.
pub const BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
/// Failure share that opens a breaker.
pub const BREAKER_FAILURE_PERCENT: u32 = 50;
/// The failure-rate window.
pub const BREAKER_WINDOW: Duration = Duration::from_secs(30);
/// Requests the failure-rate window needs.
pub const BREAKER_MIN_REQUESTS: u32 = 20;
/// The first open period.
pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(30);
/// The longest open period.
pub const BREAKER_MAX_OPEN_FOR: Duration = Duration::from_secs(300);
/// Probes at once while half-open.
pub const BREAKER_HALF_OPEN_PROBES: u32 = 1;
/// Extra targets a hedged request may start.
pub const HEDGE_MAX_EXTRA: u32 = 1;
/// Shadow requests in flight at once, per sidecar.
pub const SHADOW_MAX_CONCURRENT: u32 = 4;
/// How long a shadow request may take.
pub const SHADOW_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a target is verified when `verify` does not say.
pub const VERIFY_EVERY: Duration = Duration::from_secs(15 * 60);
/// The shortest verification period.
pub const VERIFY_MIN_EVERY: Duration = Duration::from_secs(10);
/// A verification probe's message when `verify.prompt` does not say.
pub const VERIFY_PROMPT: &str = "Reply with OK.";
/// A verification probe's answer, in tokens, when `verify.maxTokens` does not say.
pub const VERIFY_MAX_TOKENS: u32 = 1;
/// How long a verification probe may take when `verify.timeout` does not say.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);
