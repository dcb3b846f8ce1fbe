//! What an upstream's rate-limit headers say: how long to wait (`Retry-After`,
//! `retry-after-ms`) and how much of the key's quota is left (`x-ratelimit-*`).

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::llm::go_duration as duration;

/// What a provider's `x-ratelimit-*` headers say about the key's remaining quota.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Headroom {
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-requests`.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-reset-tokens`.
    pub reset_tokens: Option<Duration>,
}

impl Headroom {
    /// Reads OpenAI-style rate-limit headers.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        Headroom {
            remaining_requests: text("x-ratelimit-remaining-requests").and_then(|v| v.parse().ok()),
            remaining_tokens: text("x-ratelimit-remaining-tokens").and_then(|v| v.parse().ok()),
            reset_requests: text("x-ratelimit-reset-requests").and_then(parse_reset),
            reset_tokens: text("x-ratelimit-reset-tokens").and_then(parse_reset),
        }
    }

    /// How long the key is out of requests or tokens, if the headers say it is: the balancer
    /// steers away from it until then, before it returns a 429.
    pub fn exhausted_for(&self) -> Option<Duration> {
        let requests =
            (self.remaining_requests == Some(0)).then(|| self.reset_requests.unwrap_or(Duration::from_secs(1)));
        let tokens = (self.remaining_tokens == Some(0)).then(|| self.reset_tokens.unwrap_or(Duration::from_secs(1)));
        requests.into_iter().chain(tokens).max()
    }
}

/// The longest wait an upstream can impose through its headers: one day. Anything longer is
/// read as one day, so no arithmetic on instants can overflow.
const MAX_UPSTREAM_WAIT_SECS: f64 = 86_400.0;

/// Parses a rate-limit reset such as `1s`, `6m0s`, `59.5s`, `120ms` or a bare number of seconds.
fn parse_reset(text: &str) -> Option<Duration> {
    let cap = Duration::from_secs_f64(MAX_UPSTREAM_WAIT_SECS);
    match text.parse::<f64>() {
        Ok(secs) => (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(cap.as_secs_f64()))),
        Err(_) => duration::parse_capped(text, cap),
    }
}

/// The wait an upstream asked for: `retry-after-ms` (OpenAI, Azure), else `Retry-After` as
/// seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(MAX_UPSTREAM_WAIT_SECS)));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_UPSTREAM_WAIT_SECS)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO).min(Duration::from_secs_f64(MAX_UPSTREAM_WAIT_SECS)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn reads_rate_limit_headroom() {
        let mut headers = HeaderMap::new();
        assert_eq!(Headroom::from_headers(&headers).exhausted_for(), None);
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("0"));
        headers.insert("x-ratelimit-reset-requests", HeaderValue::from_static("1m30.5s"));
        headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from_static("1200"));
        headers.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("120ms"));
        let headroom = Headroom::from_headers(&headers);
        assert_eq!(headroom.reset_tokens, Some(Duration::from_millis(120)));
        assert_eq!(headroom.exhausted_for(), Some(Duration::from_secs_f64(90.5)));
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("7"));
        assert_eq!(Headroom::from_headers(&headers).exhausted_for(), None);
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_reset("soon"), None);
        // An upstream's header is untrusted: odd input is ignored, never a panic (the
        // `go-parse-duration` crate panics on these).
        for odd in ["1é", "é", "1.é", "+é", "1µ", "..s", ""] {
            assert_eq!(parse_reset(odd), None, "{odd:?}");
        }
        assert_eq!(parse_reset("1e20"), Some(Duration::from_secs(86_400)), "clamped: no instant arithmetic overflows");
        assert_eq!(parse_reset("99999999999999999999h"), Some(Duration::from_secs(86_400)));
        let mut huge = HeaderMap::new();
        huge.insert("retry-after-ms", HeaderValue::from_static("1e25"));
        assert_eq!(retry_after(&huge, SystemTime::UNIX_EPOCH), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn reads_retry_after_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert("retry-after", HeaderValue::from_static("5"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(5)));
        headers.insert("retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_millis(1500)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        headers.insert("retry-after", HeaderValue::from_str(&date).expect("header"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_millis(250)));
        headers.insert("retry-after-ms", HeaderValue::from_static("nonsense"));
        headers.insert("retry-after", HeaderValue::from_static("garbage"));
        assert_eq!(retry_after(&headers, now), None);
    }
}
