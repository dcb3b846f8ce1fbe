//! Durations as users write them in a policy, in Go's syntax as Kubernetes users write them
//! (`250ms`, `30s`, `1m30s`, `1.5h`): greater than zero, at most a day. The CRD's CEL rules
//! check the same, so the API server and the compiler agree.

use std::time::Duration;

use crate::llm::go_duration;

/// The longest duration a policy may name.
pub const MAX: Duration = Duration::from_secs(86_400);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// A leading minus.
    #[error("`{0}` is negative; durations must be greater than zero")]
    Negative(String),
    /// Not a duration at all.
    #[error("`{0}` is not a duration (write it like `500ms`, `30s` or `1m30s`)")]
    Unreadable(String),
    /// Zero.
    #[error("must be greater than zero")]
    Zero,
    /// More than a day.
    #[error("`{0}` is longer than the 24h maximum")]
    TooLong(String),
}

/// Parses a duration such as `250ms`, `30s`, `1m30s` or `2h`: greater than zero, at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(DurationError::Negative(text.to_string()));
    }
    let seconds = go_duration::seconds(trimmed).ok_or_else(|| DurationError::Unreadable(text.to_string()))?;
    if seconds == 0.0 {
        return Err(DurationError::Zero);
    }
    if seconds > MAX.as_secs_f64() {
        return Err(DurationError::TooLong(text.to_string()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubernetes_users_write_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("25h"), Err(DurationError::TooLong("25h".into())));
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_duration("100000h"), Err(DurationError::TooLong("100000h".into())));
        assert!(
            matches!(parse_duration("2days"), Err(DurationError::Unreadable(_))),
            "Go syntax, as the API server reads it"
        );
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero));
        assert!(matches!(parse_duration("-5s"), Err(DurationError::Negative(_))));
        assert!(parse_duration("").is_err());
    }
}
