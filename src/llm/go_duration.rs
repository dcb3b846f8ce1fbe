//! Durations in Go's syntax (`250ms`, `30s`, `1m30s`, `1.5h`): what Kubernetes users write,
//! what the API server's CEL `duration()` reads, and what providers send in rate-limit reset
//! headers. One parser for all three, so a policy the API server accepts compiles the same.

use std::time::Duration;

/// The seconds a Go-style duration names: a sequence of decimal numbers, each with an optional
/// fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), such as `1m30.5s`. No sign:
/// negative durations mean nothing here. `None` for anything else; never panics, whatever the
/// input (it reads untrusted headers).
pub fn seconds(text: &str) -> Option<f64> {
    if text.is_empty() {
        return None;
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    total.is_finite().then_some(total)
}

/// The duration `text` names, if it is one (see [`seconds`]); at most `cap`.
pub fn parse_capped(text: &str, cap: Duration) -> Option<Duration> {
    seconds(text).map(|s| Duration::from_secs_f64(s.min(cap.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_go_reads() {
        assert_eq!(seconds("250ms"), Some(0.25));
        assert_eq!(seconds("1m30s"), Some(90.0));
        assert_eq!(seconds("1m30.5s"), Some(90.5));
        assert_eq!(seconds("1.5h"), Some(5400.0));
        assert_eq!(seconds("0s"), Some(0.0));
        for odd in ["", "10", "-5s", "+5s", "soon", "1é", "é", "1.é", ".s", "..s", "1 s", "1d"] {
            assert_eq!(seconds(odd), None, "{odd:?}");
        }
        assert_eq!(parse_capped("1e20s", Duration::from_secs(86_400)), None, "no exponents in Go's syntax");
        assert_eq!(parse_capped("99999999999999999999h", Duration::from_secs(60)), Some(Duration::from_secs(60)));
    }
}
