//! Durations as users write them in a policy: `250ms`, `30s`, `1m30s`, `2h`.

use std::time::Duration;

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
    let duration = humantime::parse_duration(trimmed).map_err(|_| DurationError::Unreadable(text.to_string()))?;
    if duration.is_zero() {
        return Err(DurationError::Zero);
    }
    if duration > MAX {
        return Err(DurationError::TooLong(text.to_string()));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubernetes_users_write_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_duration("100000000y"), Err(DurationError::TooLong("100000000y".into())));
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero));
        assert!(matches!(parse_duration("-5s"), Err(DurationError::Negative(_))));
        assert!(parse_duration("").is_err());
    }
}
