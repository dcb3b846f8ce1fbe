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
//! fleet reconnecting at once after an operator restart costs one review per pod. Any pod can
//! mount a token for the `backstop` audience, so the API server is shielded from the callers:
//! at most [`CONCURRENT_REVIEWS`] TokenReviews run at a time for sidecars and peers together
//! (a caller waits at most [`REVIEW_WAIT`], then gets 503); a refused token is remembered for
//! [`REFUSED_FOR`]; and a token is read before any review (a JWT for the `backstop` audience,
//! not expired, bound to a pod; for a peer, of this operator's own ServiceAccount), so a
//! stranger costs the API server nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::core::PartialObjectMeta;
use kube::{Api, Client};
use parking_lot::Mutex;
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
/// How long a caller waits for a review slot before it is told to come back.
pub const REVIEW_WAIT: Duration = Duration::from_secs(5);
/// How long a refused token is refused again without a review.
pub const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Refused tokens remembered at most.
const REFUSED_ENTRIES: usize = 10_000;

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
    /// Every review slot stayed busy for [`REVIEW_WAIT`].
    #[error("too many tokens to check at once; try again shortly")]
    Busy,
    /// The same token was refused moments ago: the same answer, without asking again.
    #[error("{why}")]
    RefusedBefore {
        /// The status of the first refusal.
        status: http::StatusCode,
        /// What the first refusal said.
        why: String,
    },
}

impl AuthError {
    /// The HTTP status for it.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Missing | AuthError::Rejected(_) => http::StatusCode::UNAUTHORIZED,
            AuthError::NotBoundToPod | AuthError::PodGone(_) => http::StatusCode::FORBIDDEN,
            AuthError::Unavailable(_) | AuthError::Busy => http::StatusCode::SERVICE_UNAVAILABLE,
            AuthError::RefusedBefore { status, .. } => *status,
        }
    }

    /// Whether the token itself was refused (and may be refused again without a review).
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            AuthError::Missing
                | AuthError::Rejected(_)
                | AuthError::NotBoundToPod
                | AuthError::PodGone(_)
                | AuthError::RefusedBefore { .. }
        )
    }
}

/// Checks tokens with the API server.
pub struct Authenticator {
    client: Client,
    cache: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    /// Tokens refused lately, by SHA-256: the refusal's status and words, and until when.
    refused: Mutex<HashMap<[u8; 32], (http::StatusCode, String, Instant)>>,
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
            refused: Mutex::default(),
            reviews: Semaphore::new(CONCURRENT_REVIEWS),
            own_user: Mutex::default(),
        }
    }

    /// One review slot, shared by sidecars and peers, waited for at most [`REVIEW_WAIT`].
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AuthError> {
        match tokio::time::timeout(REVIEW_WAIT, self.reviews.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(AuthError::Busy),
        }
    }

    /// A refusal remembered for `key`, if one is.
    fn refused_before(&self, key: &[u8; 32], now: Instant) -> Option<AuthError> {
        let refused = self.refused.lock();
        refused
            .get(key)
            .filter(|(_, _, until)| *until > now)
            .map(|(status, why, _)| AuthError::RefusedBefore { status: *status, why: why.clone() })
    }

    /// Remembers a refusal of `key` for [`REFUSED_FOR`].
    fn remember(&self, key: [u8; 32], error: &AuthError, now: Instant) {
        if !error.is_refusal() {
            return;
        }
        let mut refused = self.refused.lock();
        if refused.len() >= REFUSED_ENTRIES {
            refused.retain(|_, (_, _, until)| *until > now);
        }
        if refused.len() < REFUSED_ENTRIES {
            refused.insert(key, (error.status(), error.to_string(), now + REFUSED_FOR));
        }
    }

    /// The pod `token` belongs to.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let key = fingerprint(token);
        let now = Instant::now();
        if let Some((identity, _)) = self.cached(&key, now) {
            return Ok(identity);
        }
        if let Some(refused) = self.refused_before(&key, now) {
            return Err(refused);
        }
        let result = self.authenticate_fresh(token, key, now).await;
        if let Err(error) = &result {
            self.remember(key, error, now);
        }
        result
    }

    async fn authenticate_fresh(&self, token: &str, key: [u8; 32], now: Instant) -> Result<Identity, AuthError> {
        let claims = Claims::read(token)?;
        claims.for_a_pod()?;
        let _permit = self.slot().await?;
        if let Some((identity, _)) = self.cached(&key, now) {
            return Ok(identity);
        }
        let identity = self.review(token).await?;
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, until)| *until > now);
        }
        if cache.len() < CACHE_ENTRIES {
            cache.insert(key, (identity.clone(), now + CACHE_FOR));
        }
        Ok(identity)
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> Option<(Identity, Instant)> {
        let cache = self.cache.lock();
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
    /// replica's own token (`own_token_file`) belongs to. A token that does not even claim to
    /// be of that ServiceAccount is refused without a review.
    pub async fn authenticate_peer(&self, token: &str, own_token_file: &std::path::Path) -> Result<String, AuthError> {
        let key = fingerprint(token);
        let now = Instant::now();
        if let Some(refused) = self.refused_before(&key, now) {
            return Err(refused);
        }
        let result = self.authenticate_peer_fresh(token, own_token_file).await;
        if let Err(error) = &result {
            self.remember(key, error, now);
        }
        result
    }

    async fn authenticate_peer_fresh(
        &self,
        token: &str,
        own_token_file: &std::path::Path,
    ) -> Result<String, AuthError> {
        let mine = std::fs::read_to_string(own_token_file).map_err(|e| {
            AuthError::Rejected(format!("this replica cannot vouch for peers without its own token: {e}"))
        })?;
        let claims = Claims::read(token)?;
        let own_claims = Claims::read(mine.trim())?;
        if claims.subject != own_claims.subject {
            return Err(AuthError::Rejected(format!(
                "`{}` is not this operator's ServiceAccount",
                bounded(&claims.subject)
            )));
        }
        let own = self.own_user.lock().clone();
        let own = match own {
            Some(own) => own,
            None => {
                let _permit = self.slot().await?;
                let (own, _) = self.review_user(mine.trim()).await?;
                *self.own_user.lock() = Some(own.clone());
                own
            }
        };
        let (user, _) = {
            let _permit = self.slot().await?;
            self.review_user(token).await?
        };
        if user != own {
            return Err(AuthError::Rejected(format!("`{user}` is not this operator's ServiceAccount")));
        }
        Ok(user)
    }
}

/// The SHA-256 of a token: how caches know it without keeping it.
fn fingerprint(token: &str) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().try_into().unwrap_or([0; 32])
}

/// At most 128 bytes of what a caller claimed, for a refusal.
fn bounded(text: &str) -> String {
    let mut end = text.len().min(128);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// What a token claims, read before any review: nothing here is trusted, it only spares the
/// API server a review of a token that would fail it anyway.
#[derive(Debug, Default, PartialEq, Eq)]
struct Claims {
    subject: String,
    audiences: Vec<String>,
    expires: Option<i64>,
    pod: bool,
}

impl Claims {
    /// The claims of a JWT; a token that is not one is refused.
    fn read(token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let not_a_token = || AuthError::Rejected("not a ServiceAccount token (JWT)".into());
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(not_a_token());
        };
        if payload.len() > 16 << 10 {
            return Err(not_a_token());
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| not_a_token())?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| not_a_token())?;
        let audiences = match &claims["aud"] {
            serde_json::Value::String(one) => vec![one.clone()],
            serde_json::Value::Array(many) => many.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        Ok(Claims {
            subject: claims["sub"].as_str().unwrap_or_default().to_string(),
            audiences,
            expires: claims["exp"].as_i64(),
            pod: claims.pointer("/kubernetes.io/pod/uid").is_some(),
        })
    }

    /// Whether the claims could be a sidecar's: audience `backstop`, not expired, bound to a pod.
    fn for_a_pod(&self) -> Result<(), AuthError> {
        if !self.audiences.iter().any(|a| a == AUDIENCE) {
            return Err(AuthError::Rejected(format!("the token's audiences do not include `{AUDIENCE}`")));
        }
        if self.expires.is_some_and(|exp| exp <= Timestamp::now().as_second()) {
            return Err(AuthError::Rejected("the token has expired".into()));
        }
        if !self.pod {
            return Err(AuthError::NotBoundToPod);
        }
        Ok(())
    }
}

/// The `exp` claim of a JWT the API server has already verified.
fn expiry(token: &str) -> Option<Timestamp> {
    Timestamp::from_second(Claims::read(token).ok()?.expires?).ok()
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

    fn token(claims: serde_json::Value) -> String {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")
    }

    #[test]
    fn a_token_that_would_fail_the_review_is_refused_before_it() {
        let far = Timestamp::now().as_second() + 3600;
        let pod = serde_json::json!({"uid": "u", "name": "web-1"});
        let good = Claims::read(&token(
            serde_json::json!({"aud": ["backstop"], "exp": far, "sub": "system:serviceaccount:shop:app",
            "kubernetes.io": {"pod": pod}}),
        ))
        .expect("reads");
        assert!(good.for_a_pod().is_ok());
        let other_audience =
            Claims::read(&token(serde_json::json!({"aud": "https://kubernetes.default.svc", "exp": far,
            "kubernetes.io": {"pod": pod}})))
            .expect("reads");
        assert!(matches!(other_audience.for_a_pod(), Err(AuthError::Rejected(_))));
        let expired =
            Claims::read(&token(serde_json::json!({"aud": ["backstop"], "exp": 1, "kubernetes.io": {"pod": pod}})))
                .expect("reads");
        assert!(expired.for_a_pod().is_err());
        let unbound = Claims::read(&token(serde_json::json!({"aud": ["backstop"], "exp": far}))).expect("reads");
        assert!(matches!(unbound.for_a_pod(), Err(AuthError::NotBoundToPod)));
        for garbage in ["", "abc", "a.b.c.d", "a.!!!.c", &format!("a.{}.c", "x".repeat(20_000))] {
            assert!(Claims::read(garbage).is_err(), "{garbage:.20}");
        }
        assert_eq!(AuthError::Busy.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn refused_tokens_are_remembered_briefly_and_reviews_are_bounded() {
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().expect("url"))).expect("client");
        let auth = Authenticator::new(client);
        let stranger = token(serde_json::json!({"aud": ["elsewhere"]}));
        let first = auth.authenticate(&stranger).await.expect_err("refused");
        assert!(first.to_string().contains("do not include `backstop`"), "{first}");
        let key = fingerprint(&stranger);
        assert!(auth.refused_before(&key, Instant::now()).is_some(), "remembered");
        assert!(auth.refused_before(&key, Instant::now() + REFUSED_FOR).is_none(), "for a while only");
        // A remembered refusal answers as the first one did: its status and its words.
        let unbound = token(serde_json::json!({"aud": ["backstop"]}));
        for _ in 0..2 {
            let refused = auth.authenticate(&unbound).await.expect_err("refused");
            assert_eq!(refused.status(), http::StatusCode::FORBIDDEN, "{refused}");
            assert_eq!(refused.to_string(), AuthError::NotBoundToPod.to_string());
        }
        assert!(auth.refused_before(&fingerprint(&unbound), Instant::now()).is_some());
        // Every slot busy: a caller is told to come back rather than queue without end.
        let held: Vec<_> = futures_util::future::join_all((0..CONCURRENT_REVIEWS).map(|_| auth.slot())).await;
        assert!(held.iter().all(Result::is_ok));
        tokio::time::pause();
        assert!(matches!(auth.slot().await, Err(AuthError::Busy)));
    }

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
