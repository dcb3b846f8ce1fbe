//! Test harness: a fault-injecting OpenAI-format upstream, a sidecar on port 0, and a client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop::chain::LocalKeys;
use backstop::control::file::PolicyFile;
use backstop::proxy::passthrough::{Destinations, Passthrough};
use backstop::proxy::{Sidecar, SidecarSettings};
use backstop::snapshot::PolicyStore;
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What the upstream does with one request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answers normally (streaming if asked), with the text `from upstream`.
    Ok,
    /// Answers with this status, JSON body and extra headers.
    Status { status: u16, body: Value, headers: Vec<(&'static str, String)> },
    /// Never sends headers.
    StallBeforeHeaders,
    /// Sends 200 headers (and for streams the role chunk) and then nothing.
    StallAfterHeaders,
    /// Sends part of the answer (for streams the first content chunk) and then resets.
    CutAfterFirstChunk,
    /// Streams the first content chunk and then nothing, keeping the connection open.
    StallAfterFirstChunk,
    /// Sends 200 with a body that is not JSON (for streams an event that is not JSON).
    Garbage,
    /// Sends 200 with an OpenAI error object (for streams as the first event).
    ErrorEvent { kind: &'static str },
    /// Waits, then does the inner fault.
    Delayed(Duration, Box<Fault>),
    /// Does `matched` when the request's `Authorization` holds `key`, else `other`.
    ByKey { key: &'static str, matched: Box<Fault>, other: Box<Fault> },
    /// Answers normally (not streamed) with these extra headers.
    OkWith(Vec<(&'static str, String)>),
    /// Answers 200 with no content at all.
    Empty,
    /// Answers 200 (not streamed) with exactly this body.
    Body(&'static str),
    /// Streams the role chunk at once and the content only after this long; counts a
    /// cancellation if the client goes away before the end.
    SlowFirstToken(Duration),
    /// Streams this text (in two chunks) and then resets the connection, mid-sentence.
    CutMidStream(&'static str),
    /// Streams the start of a tool call and resets the connection in the middle of its
    /// arguments.
    CutMidToolCall,
    /// Streams this text and its finish chunk, then resets the connection before the end.
    CutAfterFinish(&'static str),
    /// Continues this sentence from the request's final assistant message: streams what of it
    /// follows that message's text (or `NOT A CONTINUATION` when it does not begin it).
    Continue(&'static str),
}

impl Fault {
    /// A plain status with an OpenAI-style error body.
    pub fn status(status: u16) -> Fault {
        let (kind, code) = match status {
            429 => ("requests", "rate_limit_exceeded"),
            401 => ("invalid_request_error", "invalid_api_key"),
            400 => ("invalid_request_error", "invalid_value"),
            _ => ("server_error", "server_error"),
        };
        let message = format!("upstream says {status}; key sk-upstream-echo-SECRET");
        Fault::Status {
            status,
            body: json!({"error": {"message": message, "type": kind, "code": code, "param": null}}),
            headers: vec![],
        }
    }

    /// A status with a `Retry-After` header.
    pub fn with_retry_after(status: u16, retry_after: &str) -> Fault {
        match Fault::status(status) {
            Fault::Status { status, body, .. } => {
                Fault::Status { status, body, headers: vec![("retry-after", retry_after.to_string())] }
            }
            other => other,
        }
    }
}

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

/// The wire API an upstream speaks when it answers normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Anthropic,
    Gemini,
}

/// A fault-injecting upstream speaking OpenAI's Chat Completions wire format on 127.0.0.1.
pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    cancelled: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Script {
    queue: Mutex<VecDeque<Fault>>,
    default: Fault,
    cancelled: Arc<std::sync::atomic::AtomicUsize>,
    wire: Wire,
}

impl Upstream {
    /// An upstream that answers every request with `fault`.
    pub async fn start(fault: Fault) -> Upstream {
        Upstream::scripted(vec![], fault).await
    }

    /// An upstream that answers with `script` in order, then with `then`.
    pub async fn scripted(script: Vec<Fault>, then: Fault) -> Upstream {
        Upstream::speaking(Wire::OpenAi, script, then).await
    }

    /// An upstream of another wire API: `Fault::Ok` answers `from anthropic` / `from gemini`
    /// in that API's format; other faults behave as for OpenAI.
    pub async fn speaking(wire: Wire, script: Vec<Fault>, then: Fault) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let cancelled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let script =
            Arc::new(Script { queue: Mutex::new(script.into()), default: then, cancelled: cancelled.clone(), wire });
        let seen = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (seen, script) = (seen.clone(), script.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let (seen, script) = (seen.clone(), script.clone());
                        async move { Ok::<_, Infallible>(answer(request, &seen, &script).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Upstream { addr, received, cancelled, task }
    }

    /// The base URL to put in a policy.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// How many requests it has received.
    pub fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// How many slow streams were abandoned by the client before their end.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn whole(status: u16, body: impl Into<Bytes>, headers: &[(&'static str, String)]) -> Response<UpBody> {
    let mut response = Response::new(UpBody::new(Full::new(body.into()).map_err(|never| match never {})));
    *response.status_mut() = StatusCode::from_u16(status).expect("status");
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    for (name, value) in headers {
        response.headers_mut().insert(*name, value.parse().expect("header"));
    }
    response
}

fn streamed(frames: Vec<Result<Bytes, BoxError>>, then_stall: bool) -> Response<UpBody> {
    // Each frame after a short pause, so hyper flushes what came before a reset.
    let items = futures_util::StreamExt::then(stream::iter(frames), |frame| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        frame.map(Frame::data)
    });
    let body: UpBody = if then_stall {
        UpBody::new(StreamBody::new(futures_util::StreamExt::chain(items, stream::pending())))
    } else {
        UpBody::new(StreamBody::new(items))
    };
    let mut response = Response::new(body);
    response.headers_mut().insert("content-type", "text/event-stream".parse().expect("header"));
    response
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

async fn answer(request: Request<Incoming>, seen: &Mutex<Vec<Received>>, script: &Script) -> Response<UpBody> {
    let headers = request.headers().clone();
    let path = request.uri().path_and_query().map(ToString::to_string).unwrap_or_default();
    let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let stream =
        body.get("stream").and_then(Value::as_bool).unwrap_or(false) || path.contains(":streamGenerateContent");
    let begun = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .filter(|m| m["role"] == "assistant")
        .map(|m| text_of(&m["content"]));
    seen.lock().expect("lock").push(Received { at: Instant::now(), path, headers: headers.clone(), body });
    let fault = script.queue.lock().expect("lock").pop_front().unwrap_or_else(|| script.default.clone());
    let inputs = received_inputs(seen);
    match (script.wire, fault) {
        (Wire::OpenAi, Fault::Ok) if inputs.0.ends_with("/embeddings") || inputs.0.contains("/embeddings?") => {
            let data: Vec<Value> = (0..inputs.1)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.5, -0.5, i as f64]}))
                .collect();
            whole(200, json!({"object": "list", "data": data, "model": "embed-up", "usage": {"prompt_tokens": 4, "total_tokens": 4}}).to_string(), &[])
        }
        (Wire::OpenAi, Fault::Ok) if inputs.0.ends_with("/responses") => responses_answer(stream),
        (Wire::Gemini, Fault::Ok) if inputs.0.contains(":batchEmbedContents") => {
            let embeddings: Vec<Value> = (0..inputs.1).map(|i| json!({"values": [0.25, i as f64]})).collect();
            whole(200, json!({"embeddings": embeddings}).to_string(), &[])
        }
        (wire, Fault::CutMidStream(text)) if stream => text_stream(wire, halves(text), true),
        (wire, Fault::Continue(sentence)) if stream => {
            let begun = begun.as_deref().unwrap_or_default();
            let rest = sentence.strip_prefix(begun).filter(|_| !begun.is_empty()).unwrap_or("NOT A CONTINUATION");
            text_stream(wire, halves(rest), false)
        }
        (Wire::OpenAi, Fault::CutAfterFinish(text)) if stream => {
            let frames = vec![
                Ok(sse(&chunk(json!({"role": "assistant", "content": ""}), None))),
                Ok(sse(&chunk(json!({"content": text}), None))),
                Ok(sse(&chunk(json!({}), Some("stop")))),
                Err("reset".into()),
            ];
            streamed(frames, false)
        }
        (Wire::OpenAi, Fault::CutMidToolCall) if stream => {
            let call = json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "weather", "arguments": "{\"city\": \"Par"}}]});
            let role = sse(&chunk(json!({"role": "assistant", "content": null}), None));
            streamed(vec![Ok(role), Ok(sse(&chunk(call, None))), Err("reset".into())], false)
        }
        (Wire::Anthropic, Fault::Ok) => anthropic_answer(stream),
        (Wire::Anthropic, Fault::CutAfterFirstChunk) if stream => anthropic_cut(),
        (Wire::Gemini, Fault::Ok) => gemini_answer(stream),
        (_, fault) => respond(fault, stream, headers, script.cancelled.clone()).await,
    }
}

fn responses_answer(stream: bool) -> Response<UpBody> {
    let done = json!({"id": "resp_up", "object": "response", "status": "completed", "model": "gpt-up", "vendor_extra": "kept",
                      "output": [{"type": "message", "id": "msg_up", "status": "completed", "role": "assistant",
                                  "content": [{"type": "output_text", "text": "from responses", "annotations": []}]}]});
    if !stream {
        return whole(200, done.to_string(), &[]);
    }
    let events = [
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up", "status": "in_progress", "output": []}}),
        json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up", "output_index": 0, "content_index": 0, "delta": "from responses"}),
        json!({"type": "response.completed", "sequence_number": 2, "response": done}),
    ];
    streamed(
        events
            .iter()
            .map(|e| Ok(Bytes::from(format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or_default()))))
            .collect(),
        false,
    )
}

/// The last request's path and how many inputs it asked to embed.
fn received_inputs(seen: &Mutex<Vec<Received>>) -> (String, usize) {
    let seen = seen.lock().expect("lock");
    let Some(last) = seen.last() else { return (String::new(), 0) };
    let count = match (&last.body["input"], &last.body["requests"]) {
        (Value::Array(items), _) => items.len(),
        (Value::String(_), _) => 1,
        (_, Value::Array(requests)) => requests.len(),
        _ => 0,
    };
    (last.path.clone(), count)
}

fn anthropic_answer(stream: bool) -> Response<UpBody> {
    if !stream {
        return whole(
            200,
            json!({"id": "msg_up", "type": "message", "role": "assistant", "model": "claude-up",
                   "content": [{"type": "text", "text": "from anthropic"}], "stop_reason": "end_turn", "stop_sequence": null,
                   "usage": {"input_tokens": 11, "output_tokens": 3}, "vendor_extra": "kept"})
            .to_string(),
            &[],
        );
    }
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
            "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 11, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "from"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " anthropic"}}),
        ),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    streamed(
        events.iter().map(|(name, data)| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))).collect(),
        false,
    )
}

/// The text of a message's `content`: a string, or the text of its text blocks.
pub fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// `text` cut in two at a character boundary near its middle.
fn halves(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let (a, b) = chars.split_at(chars.len() / 2);
    [a, b].iter().map(|half| half.iter().collect::<String>()).filter(|h| !h.is_empty()).collect()
}

/// A text stream in `wire`'s format: `pieces`, then either a reset (`cut`) or a clean end with
/// usage (20 input tokens, 4 output). A cut Anthropic stream has reported its input tokens
/// (11) and one output token.
fn text_stream(wire: Wire, pieces: Vec<String>, cut: bool) -> Response<UpBody> {
    let mut frames: Vec<Result<Bytes, BoxError>> = Vec::new();
    match wire {
        Wire::Anthropic => {
            let event = |name: &str, data: Value| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")));
            let input = if cut { 11 } else { 20 };
            frames.push(event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_cont", "type": "message",
                "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
            ));
            frames.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            for piece in pieces {
                frames.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
            if !cut {
                frames.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
                frames.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 4}})));
                frames.push(event("message_stop", json!({"type": "message_stop"})));
            }
        }
        _ => {
            frames.push(Ok(sse(&chunk(json!({"role": "assistant", "content": ""}), None))));
            for piece in pieces {
                frames.push(Ok(sse(&chunk(json!({"content": piece}), None))));
            }
            if !cut {
                frames.push(Ok(sse(&chunk(json!({}), Some("stop")))));
                let usage = json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                                   "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}});
                frames.push(Ok(sse(&usage)));
                frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
            }
        }
    }
    if cut {
        frames.push(Err("reset".into()));
    }
    streamed(frames, false)
}

/// An Anthropic stream cut right after its first text delta.
fn anthropic_cut() -> Response<UpBody> {
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
            "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 11, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "from"}}),
        ),
    ];
    let mut frames: Vec<Result<Bytes, BoxError>> =
        events.iter().map(|(name, data)| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))).collect();
    frames.push(Err("reset".into()));
    streamed(frames, false)
}

fn gemini_answer(stream: bool) -> Response<UpBody> {
    let part = |text: &str, finish: Option<&str>| {
        let mut candidate = json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        json!({"candidates": [candidate], "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 2, "totalTokenCount": 9},
               "modelVersion": "gemini-up", "responseId": "r1"})
    };
    if !stream {
        return whole(200, part("from gemini", Some("STOP")).to_string(), &[]);
    }
    streamed(vec![Ok(sse(&part("from", None))), Ok(sse(&part(" gemini", Some("STOP"))))], false)
}

/// Counts a cancellation when dropped before `finished` is set.
struct CancelGuard(Arc<std::sync::atomic::AtomicUsize>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn respond(
    fault: Fault,
    stream: bool,
    headers: HeaderMap,
    cancelled: Arc<std::sync::atomic::AtomicUsize>,
) -> std::pin::Pin<Box<dyn Future<Output = Response<UpBody>> + Send>> {
    Box::pin(async move { respond_now(fault, stream, headers, cancelled).await })
}

async fn respond_now(
    fault: Fault,
    stream: bool,
    headers: HeaderMap,
    cancelled: Arc<std::sync::atomic::AtomicUsize>,
) -> Response<UpBody> {
    let role = sse(&chunk(json!({"role": "assistant", "content": ""}), None));
    let first = sse(&chunk(json!({"content": "from"}), None));
    match fault {
        Fault::Ok if stream => streamed(
            vec![
                Ok(role),
                Ok(first),
                Ok(sse(&chunk(json!({"content": " upstream"}), None))),
                Ok(sse(&chunk(json!({}), Some("stop")))),
                Ok(Bytes::from_static(b"data: [DONE]\n\n")),
            ],
            false,
        ),
        Fault::Ok => whole(
            200,
            json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "from upstream"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, "upstream_extra": "kept"})
            .to_string(),
            &[],
        ),
        Fault::Status { status, body, headers } => whole(status, body.to_string(), &headers),
        Fault::StallBeforeHeaders => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            whole(500, "", &[])
        }
        Fault::StallAfterHeaders if stream => streamed(vec![Ok(role)], true),
        Fault::StallAfterHeaders => {
            let mut response = streamed(vec![Ok(Bytes::from_static(b"{\"id\":"))], true);
            response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
            response
        }
        Fault::StallAfterFirstChunk => streamed(vec![Ok(role), Ok(first)], true),
        Fault::CutAfterFirstChunk if stream => streamed(vec![Ok(role), Ok(first), Err("reset".into())], false),
        Fault::CutAfterFirstChunk => {
            let mut response = streamed(vec![Ok(Bytes::from_static(b"{\"id\":\"chatcmpl-up\",")), Err("reset".into())], false);
            response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
            response
        }
        Fault::Garbage if stream => streamed(vec![Ok(Bytes::from_static(b"data: <html>upstream exploded</html>\n\n"))], false),
        Fault::Garbage => whole(200, "<html>upstream exploded</html>", &[]),
        Fault::Delayed(wait, inner) => {
            tokio::time::sleep(wait).await;
            respond(*inner, stream, headers, cancelled).await
        }
        Fault::ByKey { key, matched, other } => {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
            let chosen = if auth.contains(key) { *matched } else { *other };
            respond(chosen, stream, headers, cancelled).await
        }
        Fault::OkWith(extra) => whole(
            200,
            json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "from upstream"}, "finish_reason": "stop"}]})
            .to_string(),
            &extra,
        ),
        Fault::Empty if stream => streamed(
            vec![Ok(role), Ok(sse(&chunk(json!({}), Some("stop")))), Ok(Bytes::from_static(b"data: [DONE]\n\n"))],
            false,
        ),
        Fault::Body(body) => whole(200, body.to_string(), &[]),
        Fault::Empty => whole(
            200,
            json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]})
            .to_string(),
            &[],
        ),
        Fault::SlowFirstToken(wait) => {
            let mut guard = Some(CancelGuard(cancelled, false));
            let frames = futures_util::StreamExt::then(stream::iter(0..4), move |i| {
                let role = role.clone();
                let first = first.clone();
                async move {
                    match i {
                        0 => Ok::<_, BoxError>(role),
                        1 => {
                            tokio::time::sleep(wait).await;
                            Ok(first)
                        }
                        2 => Ok(sse(&chunk(json!({}), Some("stop")))),
                        _ => Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                    }
                }
            });
            let frames = futures_util::StreamExt::map(frames, move |data| {
                if data.as_ref().is_ok_and(|d| d.starts_with(b"data: [DONE]"))
                    && let Some(guard) = guard.as_mut()
                {
                    guard.1 = true;
                }
                data.map(Frame::data)
            });
            let mut response = Response::new(UpBody::new(StreamBody::new(frames)));
            response.headers_mut().insert("content-type", "text/event-stream".parse().expect("header"));
            response
        }
        Fault::ErrorEvent { kind } if stream => streamed(
            vec![Ok(role), Ok(sse(&json!({"error": {"message": "upstream failed mid-stream", "type": kind}})))],
            false,
        ),
        Fault::ErrorEvent { kind } => whole(200, json!({"error": {"message": "upstream failed", "type": kind}}).to_string(), &[]),
        Fault::CutMidStream(_) | Fault::CutMidToolCall | Fault::CutAfterFinish(_) | Fault::Continue(_) => {
            whole(400, json!({"error": {"message": "this fault streams only", "type": "invalid_request_error"}}).to_string(), &[])
        }
    }
}

/// A sidecar serving a policy file, in this process, on ports the OS picks.
pub struct TestSidecar {
    pub llm: SocketAddr,
    pub admin: SocketAddr,
    pub policy_path: PathBuf,
    pub store: Arc<PolicyStore>,
    _dir: tempfile::TempDir,
    shutdown: watch::Sender<bool>,
}

impl TestSidecar {
    /// Writes `policy` to a file and starts a sidecar on it, waiting until it is loaded.
    pub async fn start(policy: &str) -> TestSidecar {
        TestSidecar::start_with(policy, backstop::net::client::http_client(&[]).expect("client")).await
    }

    /// [`TestSidecar::start`] with a given upstream client.
    pub async fn start_with(policy: &str, http: backstop::net::client::HttpClient) -> TestSidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("write policy");
        let store = Arc::new(PolicyStore::new());
        // Pass-through goes to a loopback port where nothing listens: no test reaches the
        // providers' public endpoints.
        let destinations =
            Destinations::new("http://127.0.0.1:9/v1", "http://127.0.0.1:9", "127.0.0.1:7400".parse().expect("addr"))
                .expect("destinations");
        let config = SidecarSettings {
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin: "127.0.0.1:0".parse().expect("addr"),
            max_request_bytes: 64 * 1024,
            drain: backstop::proxy::DEFAULT_DRAIN,
            passthrough: Some(Passthrough::new(destinations, &[]).expect("passthrough")),
            verify_locally: true,
        };
        let telemetry = backstop::telemetry::Telemetry::local(
            backstop::telemetry::Metrics::new("backstop-sidecar").expect("metrics"),
        );
        let sidecar =
            Sidecar::bind(&config, store.clone(), http, std::sync::Arc::new(telemetry)).await.expect("bind sidecar");
        let (llm, admin) = (sidecar.llm_addr().expect("addr"), sidecar.admin_addr().expect("addr"));
        let (shutdown, rx) = watch::channel(false);
        let mut policy_file = PolicyFile::new(policy_path.clone(), store.clone(), Arc::new(LocalKeys));
        policy_file.reload_and_log();
        tokio::spawn(policy_file.watch(rx.clone()));
        tokio::spawn(sidecar.run(rx));
        let loaded = Instant::now() + Duration::from_secs(5);
        while store.load().is_none() {
            assert!(Instant::now() < loaded, "the sidecar did not load its policy:\n{policy}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        TestSidecar { llm, admin, policy_path, store, _dir: dir, shutdown }
    }

    /// The URL of an LLM endpoint path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.llm)
    }

    /// The URL of an admin endpoint path.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The active policy version.
    pub fn version(&self) -> u64 {
        self.store.load().map(|s| s.version).unwrap_or(0)
    }
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// The standard two-target policy: `primary` (an OpenAI-compatible upstream) then `fallback`
/// (a mock that answers `from fallback`). `extra` is appended to `spec`.
pub fn two_target_policy(primary_base_url: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: test, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: openai-compatible, baseUrl: "{primary_base_url}", apiKey: {{value: sk-test-primary-SECRET}}}}
    - {{name: fallback, type: mock, mock: {{reply: "from fallback", chunks: 2}}}}
  routes:
    - model: chat
      chain:
        - {{provider: primary, model: up-model}}
        - {{provider: fallback, model: mock-model}}
  retry: {{attempts: 2, backoff: {{base: 10ms, max: 2s}}}}
  timeouts: {{attempt: 500ms, firstToken: 500ms, idle: 500ms, total: 10s}}
{extra}"#
    )
}

/// The value of the first Prometheus sample in `text` whose line starts with `series`, or 0.
pub fn prometheus_sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

/// A whole HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The text of a non-streamed completion.
    pub fn text(&self) -> String {
        self.json().pointer("/choices/0/message/content").and_then(Value::as_str).unwrap_or_default().to_string()
    }
}

/// A streamed answer, read to its end.
#[derive(Debug)]
pub struct Streamed {
    pub status: u16,
    pub headers: HeaderMap,
    /// Every `data:` payload in order (`[DONE]` included).
    pub events: Vec<String>,
    /// Set when the body ended with an error (a cut) rather than cleanly.
    pub broken: Option<String>,
    /// The body as sent, SSE comments included.
    pub raw: String,
}

impl Streamed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The concatenated content deltas.
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| v.pointer("/choices/0/delta/content").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    pub fn done(&self) -> bool {
        self.events.last().is_some_and(|e| e == "[DONE]")
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POSTs `body` (raw bytes) and reads the whole answer, within 20 s.
pub async fn post_raw(url: &str, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).expect("request");
    let work = async {
        let response = client().request(request).await.expect("sidecar answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        Answer { status: parts.status.as_u16(), headers: parts.headers, body }
    };
    tokio::time::timeout(Duration::from_secs(20), work).await.expect("answer within 20 s")
}

/// POSTs a JSON body.
pub async fn post(url: &str, body: &Value) -> Answer {
    post_raw(url, body.to_string(), &[]).await
}

/// GETs a URL.
pub async fn get(url: &str) -> Answer {
    let request = Request::get(url).body(Full::new(Bytes::new())).expect("request");
    let work = async {
        let response = client().request(request).await.expect("answers");
        let (parts, body) = response.into_parts();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    };
    tokio::time::timeout(Duration::from_secs(20), work).await.expect("answer within 20 s")
}

/// POSTs a streaming request and reads every event until the body ends or breaks.
pub async fn post_stream(url: &str, body: &Value) -> Streamed {
    post_stream_with(url, body, &[]).await
}

/// [`post_stream`] with extra request headers.
pub async fn post_stream_with(url: &str, body: &Value, headers: &[(&str, &str)]) -> Streamed {
    let mut request = Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).expect("request");
    let work = async {
        let response = client().request(request).await.expect("sidecar answers");
        let (parts, mut body) = response.into_parts();
        let mut decoder = backstop::provider::sse::Decoder::new(1 << 20);
        let mut events = Vec::new();
        let mut broken = None;
        let mut raw = String::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        raw.push_str(&String::from_utf8_lossy(&data));
                        decoder.push(&data);
                        while let Some(event) = decoder.next_event().expect("event size") {
                            events.push(event.data);
                        }
                    }
                }
                Some(Err(error)) => {
                    broken = Some(error.to_string());
                    break;
                }
                None => break,
            }
        }
        events.extend(decoder.finish().map(|e| e.data));
        Streamed { status: parts.status.as_u16(), headers: parts.headers, events, broken, raw }
    };
    tokio::time::timeout(Duration::from_secs(20), work).await.expect("stream within 20 s")
}

/// A chat request for the `chat` route.
pub fn chat(stream: bool) -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "stream": stream})
}

/// An address on which nothing listens.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}
