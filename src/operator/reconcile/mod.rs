//! One reconcile of one `FallbackPolicy`: read the Secrets it names, compile it with the same
//! compiler the sidecar uses, serve the result if it is good (an invalid generation never
//! replaces the last good one), and, on the leader only, write the status and an Event when
//! the verdict changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::Context;
use super::secrets::{SecretKeys, referenced};
use super::served::ServedPolicy;
use super::status::{self, FIELD_MANAGER, Reason, Verdict};
use crate::backoff::Backoff;
use crate::chain::compile;
use crate::policy::FallbackPolicy;

/// Why a reconcile could not finish; the controller retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The policy has no namespace (the API server never sends one without).
    #[error("the policy has no namespace")]
    NoNamespace,
}

/// The result of a reconcile.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How often a good policy is compiled again anyway: a safety net under the watches.
const RESYNC: Duration = Duration::from_secs(30 * 60);
/// How soon a policy waiting for a Secret is tried again, should the Secret's watch event
/// be missed.
const SECRET_RETRY: Duration = Duration::from_secs(60);

/// Reconciles one policy.
pub async fn reconcile(policy: Arc<FallbackPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let outcome = reconcile_inner(&policy, &ctx).await;
    let result = match &outcome {
        Ok(Reason::Compiled) => "compiled",
        Ok(_) => "rejected",
        Err(_) => "error",
    };
    ctx.instruments.reconciles.add(1, &[KeyValue::new("result", result)]);
    ctx.instruments.duration.record(started.elapsed().as_secs_f64(), &[]);
    match outcome? {
        Reason::Compiled => Ok(Action::requeue(RESYNC)),
        Reason::SecretNotFound | Reason::SecretKeyNotFound | Reason::SecretNotLabelled => {
            Ok(Action::requeue(SECRET_RETRY))
        }
        Reason::InvalidPolicy | Reason::InlineKeyRefused => Ok(Action::await_change()),
    }
}

async fn reconcile_inner(policy: &FallbackPolicy, ctx: &Context) -> Result<Reason> {
    let namespace = policy.namespace().ok_or(Error::NoNamespace)?;
    let name = policy.name_any();
    let secrets = match SecretKeys::read(
        &Api::<Secret>::namespaced(ctx.client.clone(), &namespace),
        referenced(&policy.spec),
        ctx.require_credentials_label,
    )
    .await
    {
        Ok(secrets) => secrets,
        Err(error) => {
            // Not knowing is no reason to take anything from sidecars: they hold theirs.
            let reason = format!("cannot read its Secrets: {error}");
            ctx.served.hold(&namespace, &name, policy.spec.selector.clone(), &reason);
            return Err(error.into());
        }
    };
    let verdict = match compile(policy, &secrets) {
        Ok(compiled) => {
            let version = compiled.digest();
            let routes = u32::try_from(compiled.routes.len()).unwrap_or(u32::MAX);
            let served = ServedPolicy {
                name: name.clone(),
                selector: policy.spec.selector.clone(),
                wire: crate::configstream::v2::Policy::new(&name, &policy.spec, secrets.named_by(&policy.spec)),
                compiled,
                version: version.clone(),
                generation: policy.metadata.generation.unwrap_or_default(),
                uid: policy.metadata.uid.clone().unwrap_or_default(),
            };
            if ctx.served.publish(&namespace, served) {
                tracing::info!(policy = %format!("{namespace}/{name}"), version = %version, "serving a new compiled version");
            }
            Verdict {
                reason: Reason::Compiled,
                message: format!("compiled version {version}, {routes} route(s)"),
                served: Some((version, routes)),
            }
        }
        Err(invalid) => {
            let reason = Reason::of(&invalid);
            let served = ctx
                .served
                .get(&namespace, &name)
                .map(|s| (s.version.clone(), u32::try_from(s.compiled.routes.len()).unwrap_or(u32::MAX)));
            let kept = match &served {
                Some((version, _)) => format!("; sidecars keep version {version}"),
                None => String::new(),
            };
            let problems: Vec<String> = invalid.errors.iter().map(ToString::to_string).collect();
            ctx.served.hold(&namespace, &name, policy.spec.selector.clone(), &problems.join("; "));
            tracing::info!(policy = %format!("{namespace}/{name}"), reason = reason.as_str(), problems = %problems.join("; "), "policy not compiled");
            Verdict { reason, message: format!("{}{kept}", problems.join("; ")), served }
        }
    };
    if *ctx.leader.borrow() {
        write_status(policy, &namespace, &name, &verdict, ctx).await?;
    }
    Ok(verdict.reason)
}

/// Writes the status `verdict` makes, and an Event for it, when it differs from the status the
/// API server holds: a steady reconcile writes nothing and repeats no Event.
async fn write_status(
    policy: &FallbackPolicy,
    namespace: &str,
    name: &str,
    verdict: &Verdict,
    ctx: &Context,
) -> Result<()> {
    let desired = status::desired(policy, verdict, Timestamp::now());
    if !status::changed(policy, &desired) {
        return Ok(());
    }
    let api = Api::<FallbackPolicy>::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(status::apply_patch(&desired))).await?;
    tracing::debug!(policy = %format!("{namespace}/{name}"), reason = verdict.reason.as_str(), "status written");
    let previously = policy.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let same_verdict =
        previously.is_some_and(|c| c.reason == verdict.reason.as_str() && c.message == desired.conditions[0].message);
    if !same_verdict {
        let (type_, reason) = match verdict.reason {
            Reason::Compiled => (EventType::Normal, "Compiled"),
            Reason::InvalidPolicy | Reason::InlineKeyRefused => (EventType::Warning, "Rejected"),
            Reason::SecretNotFound | Reason::SecretKeyNotFound | Reason::SecretNotLabelled => {
                (EventType::Warning, "SecretMissing")
            }
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate_note(&verdict.message)),
            action: "Compile".into(),
            secondary: None,
        };
        // An Event is a courtesy: failing to write one must not fail the reconcile.
        if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
            tracing::warn!(policy = %format!("{namespace}/{name}"), %error, "cannot record an event");
        }
    }
    Ok(())
}

/// An Event's note is at most 1 kB.
fn truncate_note(message: &str) -> String {
    let mut end = message.len().min(1000);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

/// Requeues after failed reconciles of one policy.
const REQUEUE: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// What the controller does after a failed reconcile: retry with backoff per policy, from 1 s
/// doubling up to 5 minutes, and count it.
pub fn error_policy(policy: Arc<FallbackPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any());
    let failures = ctx.note_failure(&key);
    let wait = REQUEUE.nth(failures);
    tracing::warn!(policy = %key, %error, retry_in_s = wait.as_secs(), "reconcile failed");
    Action::requeue(wait)
}

#[cfg(test)]
mod tests;
