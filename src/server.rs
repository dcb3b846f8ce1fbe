//! Serving HTTP on a listener until shutdown, then draining: the one accept loop behind every
//! listener of the sidecar and the operator.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A response body: whole or streamed.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
/// The error a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accepts connections (HTTP/1.1 and cleartext HTTP/2) and answers each request with
/// `handler` until `shutdown` turns true, then lets requests in flight finish for up to `drain`.
pub async fn serve<F, Fut>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, drain: Duration, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (socket, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(request).await) }
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service).into_owned();
                let connection = graceful.watch(connection);
                // Owned by `graceful`, which waits for it on shutdown.
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            drain_seconds = drain.as_secs(),
            "requests still in flight at the end of the drain; closing them"
        );
    }
}
