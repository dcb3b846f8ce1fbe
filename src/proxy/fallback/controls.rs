//! Per-request controls an app sends as `x-backstop-*` headers, limited to what the policy's
//! `allowRequestOverrides` allows.

use std::time::Duration;

use http::HeaderMap;

use crate::chain::parse_duration;
use crate::snapshot::{Route, Target};

/// Per-request controls from headers, already limited to what the policy allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    /// Try only the first step.
    pub no_fallback: bool,
    /// At most this many attempts (never more than the policy's cap).
    pub max_attempts: Option<u32>,
    /// A shorter total deadline.
    pub deadline: Option<Duration>,
    /// The app's SDK is retrying a request it already sent (`x-stainless-retry-count` of 1 or
    /// more): it earns no retry budget, and walks the chain only if the budget allows.
    pub client_retry: bool,
    /// A fallback drill: the targets it names (`provider/model`, `provider/model#2` or
    /// `provider`) are skipped as if drained.
    pub drill: Vec<String>,
    /// Continuing a stream that broke at the targets of these labels, the latest last
    /// (`midStream: continue`): the walk starts at the latest one's step and passes them all
    /// over, and it spends retry budget as an app's own retry does, so continuations cannot
    /// multiply an outage either.
    pub resume_after: Vec<String>,
}

/// A drill header naming no target of the route: a typo would otherwise make a drill that
/// tests nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`x-backstop-drill` names `{selector}`, which is no target of route `{route}`; its targets: {targets}")]
pub struct UnknownDrillTarget {
    /// The selector.
    pub selector: String,
    /// The route's alias.
    pub route: String,
    /// The route's targets, listed.
    pub targets: String,
}

/// Whether the drill selector `selector` names `target`: its label (`provider/model#n`), its
/// provider and model (every key), or its provider.
pub fn drill_names(selector: &str, target: &Target) -> bool {
    let label = target.label.as_str();
    selector == label
        || selector == target.provider.name
        || label.split_once('#').is_some_and(|(without_key, _)| without_key == selector)
}

impl Controls {
    /// The per-request controls an app sent as `x-backstop-*` headers, limited to what the policy
    /// allows; every other such header, and every malformed one, is ignored and logged. An
    /// allowed drill that names no target of the route is refused.
    pub fn from_headers(route: &Route, headers: &HeaderMap) -> Result<Controls, UnknownDrillTarget> {
        let client_retry = headers
            .get("x-stainless-retry-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|count| count > 0);
        let mut controls = Controls { client_retry, ..Controls::default() };
        for (name, value) in headers {
            let name = name.as_str();
            if !name.starts_with("x-backstop-") {
                continue;
            }
            let value = value.to_str().unwrap_or_default().trim();
            let applied = match name {
                "x-backstop-no-fallback" if route.overrides.no_fallback => match value {
                    "true" | "1" => {
                        controls.no_fallback = true;
                        true
                    }
                    "false" | "0" => true,
                    _ => false,
                },
                "x-backstop-max-attempts" if route.overrides.max_attempts => match value.parse::<u32>() {
                    Ok(n) if n >= 1 => {
                        controls.max_attempts = Some(n);
                        true
                    }
                    _ => false,
                },
                "x-backstop-deadline" if route.overrides.deadline => match parse_duration(value) {
                    Ok(deadline) => {
                        controls.deadline = Some(deadline);
                        true
                    }
                    Err(_) => false,
                },
                "x-backstop-drill" if route.overrides.drill => {
                    for selector in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        if !route.targets().any(|target| drill_names(selector, target)) {
                            let targets: Vec<&str> = route.targets().map(|t| t.label.as_str()).collect();
                            return Err(UnknownDrillTarget {
                                selector: selector.to_string(),
                                route: route.alias.clone(),
                                targets: targets.join(", "),
                            });
                        }
                        controls.drill.push(selector.to_string());
                    }
                    !controls.drill.is_empty()
                }
                _ => false,
            };
            if !applied {
                tracing::info!(header = name, value, route = %route.alias,
                "ignoring a request control header: unknown, malformed, or not allowed by `allowRequestOverrides`");
            }
        }
        if !controls.drill.is_empty() {
            tracing::info!(route = %route.alias, skipped = %controls.drill.join(", "), "fallback drill");
        }
        Ok(controls)
    }
}
