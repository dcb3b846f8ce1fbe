//! Failure classes: how one failed attempt is classified, in the names `fallbackOn` and
//! `circuitBreaker.countOn` use, and sets of them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How one failed request is classified. Each class is a reason a request can fall through.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailureClass {
    /// HTTP 429: the provider's rate limit.
    RateLimited,
    /// HTTP 503 or 529: the provider is overloaded or down.
    Overloaded,
    /// Any other 5xx, or a malformed answer.
    ServerError,
    /// No answer (or, for streams, no first token) within the time limit.
    Timeout,
    /// The connection could not be made or broke before an answer.
    ConnectError,
    /// HTTP 401 or 403: the key is wrong or lacks access at this provider.
    AuthError,
    /// HTTP 402, or a quota error body: the account is out of credit.
    QuotaExceeded,
    /// The prompt is longer than the model's context window.
    ContextWindowExceeded,
    /// The provider's content filter refused the prompt or the answer.
    ContentFiltered,
    /// Any other 4xx: the request itself is wrong and would fail everywhere.
    BadRequest,
    /// A 200 whose answer has no content and no tool call. Falls through only when listed in
    /// `fallbackOn`.
    EmptyCompletion,
}

impl FailureClass {
    /// Every class, in declaration order.
    pub const ALL: [FailureClass; 11] = [
        FailureClass::RateLimited,
        FailureClass::Overloaded,
        FailureClass::ServerError,
        FailureClass::Timeout,
        FailureClass::ConnectError,
        FailureClass::AuthError,
        FailureClass::QuotaExceeded,
        FailureClass::ContextWindowExceeded,
        FailureClass::ContentFiltered,
        FailureClass::BadRequest,
        FailureClass::EmptyCompletion,
    ];

    /// The name users write in `fallbackOn`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::RateLimited => "rateLimited",
            FailureClass::Overloaded => "overloaded",
            FailureClass::ServerError => "serverError",
            FailureClass::Timeout => "timeout",
            FailureClass::ConnectError => "connectError",
            FailureClass::AuthError => "authError",
            FailureClass::QuotaExceeded => "quotaExceeded",
            FailureClass::ContextWindowExceeded => "contextWindowExceeded",
            FailureClass::ContentFiltered => "contentFiltered",
            FailureClass::BadRequest => "badRequest",
            FailureClass::EmptyCompletion => "emptyCompletion",
        }
    }

    /// Transient classes: retrying the same target later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureClass::RateLimited
                | FailureClass::Overloaded
                | FailureClass::ServerError
                | FailureClass::Timeout
                | FailureClass::ConnectError
        )
    }

    /// Classes that fall through when `fallbackOn` is not set.
    pub fn falls_through_by_default(self) -> bool {
        !matches!(
            self,
            FailureClass::BadRequest
                | FailureClass::ContextWindowExceeded
                | FailureClass::ContentFiltered
                | FailureClass::EmptyCompletion
        )
    }

    /// Classes that count against a target's circuit breaker when `countOn` is not set: the
    /// ones that say something about the target rather than the request.
    pub fn counts_against_target_by_default(self) -> bool {
        self.is_transient() || matches!(self, FailureClass::AuthError | FailureClass::QuotaExceeded)
    }
}

/// A set of failure classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassSet(u16);

impl ClassSet {
    /// The classes that fall through when `fallbackOn` is not set.
    pub fn default_fallback() -> Self {
        FailureClass::ALL.into_iter().filter(|c| c.falls_through_by_default()).collect()
    }

    /// The classes a breaker counts when `circuitBreaker.countOn` is not set.
    pub fn breaker_default() -> Self {
        FailureClass::ALL.into_iter().filter(|c| c.counts_against_target_by_default()).collect()
    }

    /// Whether `class` is in the set.
    pub fn contains(self, class: FailureClass) -> bool {
        self.0 & (1 << class as u16) != 0
    }
}

impl ClassSet {
    /// The classes in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = FailureClass> {
        FailureClass::ALL.into_iter().filter(move |c| self.contains(*c))
    }
}

/// Written as the list of class names, so a compiled policy reads the same in any version.
impl Serialize for ClassSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ClassSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<FailureClass>::deserialize(deserializer)?.into_iter().collect())
    }
}

impl FromIterator<FailureClass> for ClassSet {
    fn from_iter<I: IntoIterator<Item = FailureClass>>(iter: I) -> Self {
        ClassSet(iter.into_iter().fold(0, |bits, c| bits | 1 << c as u16))
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_sets_round_trip_as_names() {
        let set: ClassSet = [FailureClass::Timeout, FailureClass::RateLimited].into_iter().collect();
        let json = serde_json::to_string(&set).expect("serializes");
        assert_eq!(json, r#"["rateLimited","timeout"]"#);
        assert_eq!(serde_json::from_str::<ClassSet>(&json).expect("parses"), set);
        assert!(ClassSet::default_fallback().contains(FailureClass::AuthError));
        assert!(!ClassSet::default_fallback().contains(FailureClass::BadRequest));
    }
}
