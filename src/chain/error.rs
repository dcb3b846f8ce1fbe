//! Why a policy was rejected: every problem found, each at the field path where the compiler
//! found it (`spec.routes[0].chain[2].timeout`), so a user fixes them all in one pass.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::keys::KeyError;
use super::policy_duration::parse_duration;

/// One problem in a policy, at a field path such as `spec.routes[0].chain[2].timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where in the document.
    pub path: String,
    /// What is wrong there.
    pub problem: String,
    /// When the problem is a key that could not be had, why.
    pub key: Option<KeyError>,
}

impl Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.path, self.problem)
    }
}

/// Why a policy was rejected: every problem found, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidPolicy {
    /// The problems, in document order.
    pub errors: Vec<FieldError>,
}

impl Display for InvalidPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        write!(f, "invalid FallbackPolicy: {}", lines.join("; "))
    }
}

impl InvalidPolicy {
    /// A single problem.
    pub fn at(path: impl Into<String>, problem: impl Display) -> Self {
        InvalidPolicy { errors: vec![FieldError { path: path.into(), problem: problem.to_string(), key: None }] }
    }

    /// The first key that could not be had, if that is among the problems.
    pub fn key_error(&self) -> Option<&KeyError> {
        self.errors.iter().find_map(|e| e.key.as_ref())
    }
}

/// The problems found so far while compiling.
#[derive(Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    /// Notes a problem at `path`.
    pub(crate) fn push(&mut self, path: impl Into<String>, problem: impl Display) {
        self.0.push(FieldError { path: path.into(), problem: problem.to_string(), key: None });
    }

    /// Notes a key that could not be had at `path`.
    pub(crate) fn push_key(&mut self, path: impl Into<String>, problem: KeyError) {
        self.0.push(FieldError { path: path.into(), problem: problem.to_string(), key: Some(problem) });
    }

    /// `Ok` when nothing was noted.
    pub(crate) fn finish(self) -> Result<(), InvalidPolicy> {
        if self.0.is_empty() { Ok(()) } else { Err(InvalidPolicy { errors: self.0 }) }
    }

    /// The duration at `path`, or `default` when unset (or, noting why, when invalid).
    pub(crate) fn duration(&mut self, value: Option<&String>, path: impl Into<String>, default: Duration) -> Duration {
        match value.map(|v| parse_duration(v)) {
            None => default,
            Some(Ok(duration)) => duration,
            Some(Err(problem)) => {
                self.push(path, problem);
                default
            }
        }
    }

    /// The number at `path` within `range`, or `default` when unset (or, noting why, when out
    /// of range).
    pub(crate) fn number(&mut self, value: Option<u32>, path: &str, range: RangeInclusive<u32>, default: u32) -> u32 {
        match value {
            Some(n) if !range.contains(&n) => {
                self.push(path, format!("{n} is not between {} and {}", range.start(), range.end()));
                default
            }
            Some(n) => n,
            None => default,
        }
    }
}
