//! Who is asking: a sidecar presents its pod's projected ServiceAccount token (audience
//! `backstop`); the API server's TokenReview says whether it is valid for that audience and
//! which pod it is bound to, and the pod's labels select its policies.
//!
//! A token that is missing, invalid, expired or for another audience is refused with 401; a
//! valid token not bound to a pod (a plain TokenRequest), or bound to a pod that no longer
//! exists, with 403. The namespace comes from the ServiceAccount, never from anything the
//! sidecar says, so a pod can only ever be served its own namespace's policies.
//!
//! Reviews are cached for a minute by the token's SHA-256 (never the token itself), so that a
//! fleet reconnecting at once after an operator restart costs one review per pod, and at most
//! [`CONCURRENT_REVIEWS`] run at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::core::PartialObjectMeta;
use kube::{Api, Client};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The audience sidecar tokens are for.
pub const AUDIENCE: &str = "backstop";
/// How long a review is trusted.
const CACHE_FOR: Duration = Duration::from_secs(60);
/// Reviews (and pod reads) in flight at once.
pub const CONCURRENT_REVIEWS: usize = 16;
/// Cached reviews at most; the cache is cleared of expired entries when full.
const CACHE_ENTRIES: usize = 100_000;

/// An authenticated sidecar's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The pod's namespace (its ServiceAccount's).
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// When the token expires, if it says.
    pub expires: Option<Timestamp>,
}

/// Why a sidecar was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("no bearer token; send the pod's projected ServiceAccount token (audience `backstop`)")]
    Missing,
    /// The API server did not accept the token for audience `backstop`.
    #[error("the token is not valid for audience `backstop`: {0}")]
    Rejected(String),
    /// The token is valid but names no pod.
    #[error("the token is not bound to a pod; use the pod's projected ServiceAccount token")]
    NotBoundToPod,
    /// The pod the token is bound to is gone (or was replaced).
    #[error("pod {0} that the token is bound to no longer exists")]
    PodGone(String),
    /// The API server could not be asked.
    #[error("cannot check the token now: {0}")]
    Unavailable(kube::Error),
}

impl AuthError {
    /// The HTTP status for it.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Missing | AuthError::Rejected(_) => http::StatusCode::UNAUTHORIZED,
            AuthError::NotBoundToPod | AuthError::PodGone(_) => http::StatusCode::FORBIDDEN,
            AuthError::Unavailable(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks tokens with the API server.
pub struct Authenticator {
    client: Client,
    cache: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    reviews: Semaphore,
    /// This replica's own user name, once reviewed.
    own_user: Mutex<Option<String>>,
}

impl Authenticator {
    /// An authenticator asking `client`'s API server.
    pub fn new(client: Client) -> Self {
        Authenticator {
            client,
            cache: Mutex::default(),
            reviews: Semaphore::new(CONCURRENT_REVIEWS),
            own_user: Mutex::default(),
        }
    }

    /// The pod `token` belongs to.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().try_into().unwrap_or([0; 32]);
        let now = Instant::now();
        if let Some((identity, _)) = self.cached(&key, now) {
            return Ok(identity);
        }
        let _permit = self.reviews.acquire().await.map_err(|_| AuthError::Missing)?;
        if let Some((identity, _)) = self.cached(&key, now) {
            return Ok(identity);
        }
        let identity = self.review(token).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, until)| *until > now);
        }
        if cache.len() < CACHE_ENTRIES {
            cache.insert(key, (identity.clone(), now + CACHE_FOR));
        }
        Ok(identity)
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> Option<(Identity, Instant)> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(identity, until)| {
                *until > now && identity.expires.is_none_or(|expires| expires > Timestamp::now())
            })
            .cloned()
    }

    /// The API server's verdict on `token` for audience `backstop`: its user name and extra
    /// claims.
    async fn review_user(&self, token: &str) -> Result<(String, BTreeMap<String, Vec<String>>), AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![AUDIENCE.to_string()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::Unavailable)?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        if !status.audiences.as_ref().is_some_and(|a| a.iter().any(|a| a == AUDIENCE)) {
            return Err(AuthError::Rejected(format!("the token's audiences do not include `{AUDIENCE}`")));
        }
        let user = status.user.unwrap_or_default();
        Ok((user.username.unwrap_or_default(), user.extra.unwrap_or_default()))
    }

    async fn review(&self, token: &str) -> Result<Identity, AuthError> {
        let (username, extra) = self.review_user(token).await?;
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(namespace, _)| namespace.to_string())
            .ok_or_else(|| AuthError::Rejected("not a ServiceAccount token".into()))?;
        let claim = |name: &str| extra.get(name).and_then(|values| values.first()).cloned();
        let (Some(pod), Some(uid)) =
            (claim("authentication.kubernetes.io/pod-name"), claim("authentication.kubernetes.io/pod-uid"))
        else {
            return Err(AuthError::NotBoundToPod);
        };
        let meta: Option<PartialObjectMeta<Pod>> = Api::<Pod>::namespaced(self.client.clone(), &namespace)
            .get_metadata_opt(&pod)
            .await
            .map_err(AuthError::Unavailable)?;
        let meta = meta.filter(|meta| meta.metadata.uid.as_deref() == Some(uid.as_str()));
        let Some(meta) = meta else { return Err(AuthError::PodGone(format!("{namespace}/{pod}"))) };
        Ok(Identity { namespace, pod, uid, labels: meta.metadata.labels.unwrap_or_default(), expires: expiry(token) })
    }

    /// Checks that `token` is another replica's: a token of the very ServiceAccount this
    /// replica's own token (`own_token_file`) belongs to.
    pub async fn authenticate_peer(&self, token: &str, own_token_file: &std::path::Path) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let own = self.own_user.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let own = match own {
            Some(own) => own,
            None => {
                let mine = std::fs::read_to_string(own_token_file).map_err(|e| {
                    AuthError::Rejected(format!("this replica cannot vouch for peers without its own token: {e}"))
                })?;
                let (own, _) = self.review_user(mine.trim()).await?;
                *self.own_user.lock().unwrap_or_else(|p| p.into_inner()) = Some(own.clone());
                own
            }
        };
        let (user, _) = self.review_user(token).await?;
        if user != own {
            return Err(AuthError::Rejected(format!("`{user}` is not this operator's ServiceAccount")));
        }
        Ok(user)
    }
}

/// The `exp` claim of a JWT the API server has already verified.
fn expiry(token: &str) -> Option<Timestamp> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Timestamp::from_second(claims.get("exp")?.as_i64()?).ok()
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &http::HeaderMap) -> &str {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_comes_from_the_verified_token_and_bearer_tokens_from_the_header() {
        let claims =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"aud":["backstop"],"exp":1796094000}"#);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln");
        assert_eq!(expiry(&token), Some(Timestamp::from_second(1_796_094_000).expect("time")));
        assert_eq!(expiry("not-a-jwt"), None);
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer(&headers), "");
        headers.insert(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer abc.def"));
        assert_eq!(bearer(&headers), "abc.def");
        assert_eq!(AuthError::Rejected("x".into()).status(), http::StatusCode::UNAUTHORIZED);
        assert_eq!(AuthError::NotBoundToPod.status(), http::StatusCode::FORBIDDEN);
    }
}
