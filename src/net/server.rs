//! Serving HTTP on a listener until shutdown, then draining: the one accept loop behind every
//! listener of the sidecar and the operator.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::body::{Body, BoxError};

/// How a listener takes connections beyond plain HTTP.
#[derive(Clone, Default)]
pub struct Options {
    /// Serve TLS with this acceptor (its ALPN decides the HTTP versions).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The most connections open at once; further ones are closed at once. `None`: no limit.
    pub max_connections: Option<usize>,
    /// The most concurrent HTTP/2 streams per connection.
    pub max_streams: Option<u32>,
    /// HTTP/2 keep-alive pings, to notice dead peers on long-lived streams.
    pub keep_alive: Option<Duration>,
    /// How long a new connection (after TLS) may take to send its first byte: the HTTP/2
    /// preface or an HTTP/1 request line. A client that connects and says nothing is closed.
    pub first_byte: Option<Duration>,
    /// How long an HTTP/1 client may take to send a request's headers once it began.
    pub header_read: Option<Duration>,
}

impl Options {
    /// Limits for a listener that faces the network (the operator's): slow and silent clients
    /// are closed, and at most `max_connections` are open at once.
    pub fn network_facing(max_connections: usize) -> Options {
        Options {
            max_connections: Some(max_connections),
            first_byte: Some(FIRST_BYTE_TIMEOUT),
            header_read: Some(HEADER_READ_TIMEOUT),
            ..Options::default()
        }
    }
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a network-facing listener waits for a connection's first byte.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a network-facing listener waits for an HTTP/1 request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that must send its first byte by a deadline; after that it is itself.
struct FirstByte<T> {
    io: T,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> FirstByte<T> {
    fn new(io: T, within: Option<Duration>) -> Self {
        FirstByte { io, deadline: within.map(|d| Box::pin(tokio::time::sleep(d))) }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByte<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.deadline = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this.deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByte<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The first line of the HTTP/2 connection preface, with which a cleartext client that knows the
/// server speaks HTTP/2 opens; any other opening is HTTP/1.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// How long a connection that opened with a part of the HTTP/2 preface has to send the rest.
const PREFACE_REST: Duration = Duration::from_secs(1);

/// Whether a cleartext connection opens with the HTTP/2 preface, seen without reading it: the
/// protocol's reader then starts from the client's whole first packet. (hyper-util's `auto`
/// reads the first 24 bytes itself and hands them back, and hyper's HTTP/1 read buffer, starting
/// from those bytes, doubled to 16 KiB on every connection.) A connection closed at once, or one
/// that opens with a part of the preface and not the rest within [`PREFACE_REST`], is left to
/// HTTP/1, which ends it.
async fn speaks_http2(socket: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut opening = [0u8; HTTP2_PREFACE.len()];
    let mut seen = socket.peek(&mut opening).await?;
    let give_up = tokio::time::Instant::now() + PREFACE_REST;
    let mut pause = Duration::from_millis(1);
    while seen > 0 && opening[..seen] == HTTP2_PREFACE[..seen] && seen < HTTP2_PREFACE.len() {
        // A part of the preface: peeking again would answer at once, so wait for the rest, a
        // little longer each time.
        if tokio::time::Instant::now() + pause > give_up {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
        seen = socket.peek(&mut opening).await?;
    }
    Ok(seen == HTTP2_PREFACE.len() && opening == HTTP2_PREFACE)
}

/// Accepts connections (HTTP/1.1 and cleartext HTTP/2) and answers each request with
/// `handler` until `shutdown` turns true, then lets requests in flight finish for up to `drain`.
pub async fn serve<F, Fut>(listener: TcpListener, shutdown: watch::Receiver<bool>, drain: Duration, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, shutdown, drain, Options::default(), handler).await;
}

/// [`serve`], with TLS and limits.
pub async fn serve_with<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    options: Options,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // TLS connections say their protocol by ALPN and are few (the operator's); `auto` serves them.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Cleartext ones (the sidecar's, every app request) are told apart by a look at their first
    // bytes and served by the protocol's own builder.
    let mut http1 = http1::Builder::new();
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    if let Some(streams) = options.max_streams {
        builder.http2().max_concurrent_streams(streams);
        http2.max_concurrent_streams(streams);
    }
    if let Some(interval) = options.keep_alive {
        builder.http2().timer(TokioTimer::new()).keep_alive_interval(interval);
        http2.timer(TokioTimer::new()).keep_alive_interval(interval);
    }
    if let Some(timeout) = options.header_read {
        builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout);
        http1.timer(TokioTimer::new()).header_read_timeout(timeout);
    }
    let first_byte = options.first_byte;
    let slots = options.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match &slots {
                    None => None,
                    Some(slots) => match slots.clone().try_acquire_owned() {
                        Ok(slot) => Some(slot),
                        Err(_) => {
                            tracing::warn!(%peer, "connection refused: at the connection limit");
                            continue;
                        }
                    },
                };
                let _ = socket.set_nodelay(true);
                let handler = handler.clone();
                // The handler's future is boxed, so a connection keeps only a pointer to it
                // between requests and while a response streams, not the whole request's state.
                let service = service_fn(move |request| {
                    let answer = Box::pin(handler(request));
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let watcher = graceful.watcher();
                match &options.tls {
                    None => {
                        let (http1, http2, mut stopping) = (http1.clone(), http2.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            let opening = async {
                                match first_byte {
                                    Some(within) => tokio::time::timeout(within, speaks_http2(&socket))
                                        .await
                                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
                                    None => speaks_http2(&socket).await,
                                }
                            };
                            let http2_preface = tokio::select! {
                                opened = opening => opened,
                                // Closed before it said anything: nothing to drain.
                                _ = stopping.wait_for(|stop| *stop) => return,
                            };
                            let ended = match http2_preface {
                                Ok(false) => watcher.watch(http1.serve_connection(TokioIo::new(socket), service)).await.map_err(BoxError::from),
                                // Rare on loopback; boxed, so HTTP/1 connections stay small.
                                Ok(true) => Box::pin(watcher.watch(http2.serve_connection(TokioIo::new(socket), service))).await.map_err(BoxError::from),
                                Err(error) => Err(BoxError::from(error)),
                            };
                            if let Err(error) = ended {
                                tracing::debug!(%peer, %error, "connection ended with an error");
                            }
                            drop(slot);
                        });
                    }
                    Some(acceptor) => {
                        let (acceptor, builder) = (acceptor.clone(), builder.clone());
                        tokio::spawn(async move {
                            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    tracing::debug!(%peer, %error, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let stream = FirstByte::new(stream, first_byte);
                            let connection = builder.serve_connection(TokioIo::new(stream), service);
                            if let Err(error) = watcher.watch(connection).await {
                                tracing::debug!(%error, "connection ended with an error");
                            }
                            drop(slot);
                        });
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client connection whose first write sends only `first` bytes, and whose next waits
    /// a quarter of a second: an HTTP/2 preface that arrives in two pieces.
    struct Hesitant {
        socket: tokio::net::TcpStream,
        first: Option<usize>,
        pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl tokio::io::AsyncRead for Hesitant {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.socket).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Hesitant {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let this = &mut *self;
            if let Some(first) = this.first.take() {
                this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(250))));
                return std::pin::Pin::new(&mut this.socket).poll_write(cx, &buf[..first.min(buf.len())]);
            }
            if let Some(pause) = &mut this.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            std::pin::Pin::new(&mut this.socket).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.socket).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.socket).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn cleartext_http1_and_http2_are_told_apart_by_their_first_bytes_even_in_pieces() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = watch::channel(false);
        let server =
            tokio::spawn(serve(listener, stopped, Duration::from_secs(1), |request: Request<Incoming>| async move {
                crate::net::body::text_response(http::StatusCode::OK, &format!("{:?}", request.version()))
            }));
        let mut plain = tokio::net::TcpStream::connect(address).await.expect("connect");
        plain.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("request");
        let mut answer = String::new();
        plain.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("HTTP/1.1"), "{answer}");
        // HTTP/2 with prior knowledge, whole and with its preface's first 5 bytes sent alone.
        for first in [None, Some(5)] {
            let socket = tokio::net::TcpStream::connect(address).await.expect("connect");
            let io = Hesitant { socket, first, pause: None };
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .expect("an HTTP/2 handshake");
            tokio::spawn(connection);
            let request = Request::get(format!("http://{address}/"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
                .await
                .expect("answered in time")
                .expect("answered");
            assert_eq!(response.version(), http::Version::HTTP_2);
            let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
            assert_eq!(&body[..], b"HTTP/2.0", "{first:?}");
        }
        stop.send_replace(true);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_silent_client_and_one_that_dribbles_its_headers_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = watch::channel(false);
        let options = Options {
            first_byte: Some(Duration::from_millis(200)),
            header_read: Some(Duration::from_millis(300)),
            ..Options::network_facing(8)
        };
        let server = tokio::spawn(serve_with(listener, stopped, Duration::from_secs(1), options, |_| async {
            crate::net::body::text_response(http::StatusCode::OK, "ok\n")
        }));
        let closed_within = |mut socket: tokio::net::TcpStream, limit: Duration| async move {
            let mut buffer = [0u8; 64];
            matches!(tokio::time::timeout(limit, socket.read(&mut buffer)).await, Ok(Ok(0) | Err(_)))
        };
        let silent = tokio::net::TcpStream::connect(address).await.expect("connect");
        assert!(closed_within(silent, Duration::from_secs(2)).await, "a silent connection is closed");
        let mut slow = tokio::net::TcpStream::connect(address).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.expect("half a request");
        assert!(closed_within(slow, Duration::from_secs(2)).await, "headers that never end are cut off");
        let mut prompt = tokio::net::TcpStream::connect(address).await.expect("connect");
        prompt.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("request");
        let mut answer = String::new();
        prompt.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.send_replace(true);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_client_that_never_speaks_does_not_hold_up_the_drain() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = watch::channel(false);
        // No first-byte limit (the sidecar's loopback listener) and a long drain.
        let server = tokio::spawn(serve(listener, stopped, Duration::from_secs(30), |_| async {
            crate::net::body::text_response(http::StatusCode::OK, "ok\n")
        }));
        let silent = tokio::net::TcpStream::connect(address).await.expect("connect");
        let mut half = tokio::net::TcpStream::connect(address).await.expect("connect");
        half.write_all(b"PRI *").await.expect("a part of the preface");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the drain does not wait for connections that never sent a request")
            .expect("server");
        drop((silent, half));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once_and_a_freed_slot_serves_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = watch::channel(false);
        let options = Options { max_connections: Some(1), ..Options::default() };
        let server = tokio::spawn(serve_with(listener, stopped, Duration::from_secs(1), options, |_| async {
            crate::net::body::text_response(http::StatusCode::OK, "ok\n")
        }));
        let mut held = tokio::net::TcpStream::connect(address).await.expect("first");
        held.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.expect("half a request");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut refused = tokio::net::TcpStream::connect(address).await.expect("second connects");
        let mut buffer = [0u8; 64];
        let read =
            tokio::time::timeout(Duration::from_secs(2), refused.read(&mut buffer)).await.expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "the second connection is closed without an answer");
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = tokio::net::TcpStream::connect(address).await.expect("third");
        third.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("request");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(2), third.read_to_string(&mut answer))
            .await
            .expect("in time")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.send_replace(true);
        server.await.expect("server");
    }
}
