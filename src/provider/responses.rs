//! OpenAI's Responses API (`POST /v1/responses`): the ingress translation to and from the
//! neutral (Chat Completions) shape, and the stream reader for `openai` targets that are sent
//! the app's own request.
//!
//! A stateless request (`store: false`, no `previous_response_id` or `conversation`) falls back
//! across providers like any chat request. A stateful one lives in OpenAI's storage, so only
//! `openai` targets are eligible for it, and the chain says so rather than lose the state.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::sse::{self, Parsed, WireStream};
use super::{AttemptError, StreamEvent};
use crate::chat::{Api, ChatRequest, InvalidRequest, Message, Operation, Origin, STATEFUL, json_object};

/// Request fields the neutral request carries (or that change nothing when dropped).
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "stream",
    "store",
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "max_output_tokens",
    "parallel_tool_calls",
    "user",
    "text",
    "metadata",
    "service_tier",
    "truncation",
    "include",
    "reasoning",
    "safety_identifier",
    "prompt_cache_key",
];

/// Whether a Responses request keeps or uses state in OpenAI's storage.
pub fn is_stateful(body: &Map<String, Value>) -> bool {
    body.get("store") != Some(&Value::Bool(false))
        || body.get("previous_response_id").is_some_and(|v| !v.is_null())
        || body.get("conversation").is_some_and(|v| !v.is_null())
        || body.get("background") == Some(&Value::Bool(true))
}

/// Parses an app's Responses request into the neutral request, keeping the original body for
/// `openai` targets.
pub fn from_responses_request(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
    let invalid = |message: String, param: Option<&'static str>| InvalidRequest { message, param };
    let raw = json_object(body)?;
    let model = match raw.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("you must provide a model parameter (`model` is missing)".into(), Some("model"))),
    };
    let stream = match raw.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be a boolean".into(), Some("stream"))),
    };
    let mut unportable: Vec<String> = raw.keys().filter(|k| !FIELDS.contains(&k.as_str())).cloned().collect();
    let mut messages = Vec::new();
    if let Some(instructions) = raw.get("instructions").and_then(Value::as_str) {
        messages.push(message("system", json!(instructions)));
    }
    match raw.get("input") {
        Some(Value::String(text)) if !text.is_empty() => messages.push(message("user", json!(text))),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages, &mut unportable)
                    .map_err(|problem| invalid(format!("`input[{i}]`: {problem}"), Some("input")))?;
            }
        }
        _ => return Err(invalid("`input` must be a non-empty string or array of items".into(), Some("input"))),
    }
    let mut rest = Map::new();
    for name in ["temperature", "top_p", "parallel_tool_calls", "user", "metadata", "service_tier"] {
        if let Some(v) = raw.get(name).filter(|v| !v.is_null()) {
            rest.insert(name.into(), v.clone());
        }
    }
    if let Some(max) = raw.get("max_output_tokens").filter(|v| !v.is_null()) {
        rest.insert("max_completion_tokens".into(), max.clone());
    }
    if let Some(effort) = raw.get("reasoning").and_then(|r| r.get("effort")).filter(|v| !v.is_null()) {
        rest.insert("reasoning_effort".into(), effort.clone());
    }
    if let Some(tools) = raw.get("tools").and_then(Value::as_array) {
        let mut converted = Vec::new();
        for tool in tools {
            match tool.get("type").and_then(Value::as_str) {
                Some("function") => {
                    let mut function = json!({"name": tool["name"], "parameters": tool.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                    for key in ["description", "strict"] {
                        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                            function[key] = v.clone();
                        }
                    }
                    converted.push(json!({"type": "function", "function": function}));
                }
                other => unportable.push(format!("tools[type={}]", other.unwrap_or("unknown"))),
            }
        }
        if !converted.is_empty() {
            rest.insert("tools".into(), Value::Array(converted));
        }
    }
    match raw.get("tool_choice") {
        Some(Value::String(mode)) => {
            rest.insert("tool_choice".into(), json!(mode));
        }
        Some(choice) if choice.get("type").and_then(Value::as_str) == Some("function") => {
            rest.insert("tool_choice".into(), json!({"type": "function", "function": {"name": choice["name"]}}));
        }
        Some(Value::Null) | None => {}
        Some(_) => unportable.push("tool_choice".into()),
    }
    match raw.get("text").and_then(|t| t.get("format")) {
        Some(format) if format["type"] == "json_schema" => {
            let mut schema =
                json!({"name": format.get("name").cloned().unwrap_or(json!("response")), "schema": format["schema"]});
            if let Some(strict) = format.get("strict") {
                schema["strict"] = strict.clone();
            }
            rest.insert("response_format".into(), json!({"type": "json_schema", "json_schema": schema}));
        }
        Some(format) if format["type"] == "json_object" => {
            rest.insert("response_format".into(), json!({"type": "json_object"}));
        }
        _ => {}
    }
    if stream {
        rest.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if is_stateful(&raw) {
        unportable.insert(0, STATEFUL.into());
    }
    Ok(ChatRequest {
        model,
        messages,
        stream,
        rest,
        origin: Some(std::sync::Arc::new(Origin { api: Api::Responses, body: raw, unportable, headers: Vec::new() })),
        operation: Operation::Chat,
    })
}

fn message(role: &str, content: Value) -> Message {
    Message { role: role.to_string(), content: Some(content), rest: Map::new() }
}

fn input_item(
    item: &Value,
    index: usize,
    messages: &mut Vec<Message>,
    unportable: &mut Vec<String>,
) -> Result<(), String> {
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let role = item.get("role").and_then(Value::as_str).ok_or("a message needs a `role`")?;
            if !matches!(role, "user" | "assistant" | "system" | "developer") {
                return Err(format!("unknown role `{role}`"));
            }
            let content = match item.get("content") {
                Some(Value::String(text)) => json!(text),
                Some(Value::Array(parts)) => {
                    let mut converted = Vec::new();
                    for part in parts {
                        match part.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text") => converted
                                .push(json!({"type": "text", "text": part.get("text").cloned().unwrap_or(json!(""))})),
                            Some("input_image") if part.get("image_url").is_some_and(Value::is_string) => {
                                converted.push(json!({"type": "image_url", "image_url": {"url": part["image_url"]}}))
                            }
                            Some("refusal") => {}
                            other => {
                                unportable.push(format!("input[{index}].content[type={}]", other.unwrap_or("unknown")))
                            }
                        }
                    }
                    if converted.iter().all(|p| p["type"] == "text") {
                        json!(converted.iter().filter_map(|p| p["text"].as_str()).collect::<String>())
                    } else {
                        Value::Array(converted)
                    }
                }
                _ => return Err("a message needs `content`".into()),
            };
            messages.push(message(role, content));
        }
        "function_call" => {
            let call = json!({"id": item["call_id"], "type": "function",
                              "function": {"name": item["name"], "arguments": item.get("arguments").cloned().unwrap_or(json!("{}"))}});
            match messages.last_mut() {
                Some(last) if last.role == "assistant" && last.rest.contains_key("tool_calls") => {
                    if let Some(calls) = last.rest.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        calls.push(call);
                    }
                }
                _ => {
                    let mut m = Message { role: "assistant".into(), content: None, rest: Map::new() };
                    m.rest.insert("tool_calls".into(), json!([call]));
                    messages.push(m);
                }
            }
        }
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            let mut m = message("tool", json!(output));
            m.rest.insert("tool_call_id".into(), item.get("call_id").cloned().unwrap_or(json!("")));
            messages.push(m);
        }
        "reasoning" => {}
        other => unportable.push(format!("input[{index}][type={other}]")),
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn response_id(id: Option<&str>) -> String {
    match id {
        Some(id) if id.starts_with("resp_") => id.to_string(),
        Some(id) => format!("resp_{id}"),
        None => "resp_backstop".into(),
    }
}

/// The parts of the app's request a Response object echoes back.
fn echo(request: &ChatRequest) -> Map<String, Value> {
    let body = request.origin.as_deref().map(|o| o.body.clone()).unwrap_or_default();
    let mut echo = Map::new();
    for (name, default) in [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("parallel_tool_calls", json!(true)),
        ("previous_response_id", Value::Null),
        ("temperature", json!(1.0)),
        ("top_p", json!(1.0)),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("text", json!({"format": {"type": "text"}})),
        ("truncation", json!("disabled")),
        ("metadata", json!({})),
        ("store", json!(false)),
        ("user", Value::Null),
    ] {
        echo.insert(name.into(), body.get(name).cloned().unwrap_or(default));
    }
    echo
}

fn usage(chat_usage: &Value) -> Value {
    let input = chat_usage.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let output = chat_usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
           "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input.saturating_add(output)})
}

fn response_object(
    id: &str,
    model: &Value,
    status: &str,
    output: Vec<Value>,
    usage: Value,
    echo: &Map<String, Value>,
) -> Value {
    let mut response = json!({"id": id, "object": "response", "created_at": now(), "status": status, "error": null,
                              "incomplete_details": null, "model": model, "output": output, "usage": usage});
    if let Some(object) = response.as_object_mut() {
        object.extend(echo.clone());
    }
    response
}

/// A chat completion as a Response object.
pub fn from_chat_completion(completion: &Value, request: &ChatRequest) -> Value {
    let id = response_id(completion.get("id").and_then(Value::as_str));
    let choice = &completion["choices"][0];
    let message = &choice["message"];
    let mut output = Vec::new();
    if let Some(text) = message.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        output.push(json!({"type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": text, "annotations": []}]}));
    }
    for (n, call) in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        output.push(json!({"type": "function_call", "id": format!("fc_{id}_{n}"), "call_id": call["id"],
                           "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}));
    }
    let status =
        if choice.get("finish_reason").and_then(Value::as_str) == Some("length") { "incomplete" } else { "completed" };
    let mut response =
        response_object(&id, &completion["model"], status, output, usage(&completion["usage"]), &echo(request));
    if status == "incomplete" {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    response
}

/// A Response object as a chat completion (to check it for content).
pub fn to_chat_completion(response: &Value) -> Value {
    let output = response.get("output").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let text: String = output
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().into_iter().flatten())
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect();
    let calls: Vec<Value> = output
        .iter()
        .filter(|item| item["type"] == "function_call")
        .map(|item| json!({"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}))
        .collect();
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({"id": response["id"], "object": "chat.completion", "model": response["model"],
           "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
}

/// Reads a Responses event stream from an `openai` target: `response.completed` (or
/// `incomplete`) ends it; `response.failed` and `error` fail it.
#[derive(Debug, Default)]
pub struct EventParser {
    done: bool,
}

impl WireStream for EventParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        let data = match sse::json_data(&event.data) {
            Ok(data) => data,
            Err(error) => return Parsed::Fail(error),
        };
        let kind = data.get("type").and_then(Value::as_str).unwrap_or_default();
        let (content, end) = match kind {
            "error" => return Parsed::Fail(AttemptError::from_stream_error(&data)),
            "response.failed" => {
                let error = data.pointer("/response/error").cloned().unwrap_or(Value::Null);
                return Parsed::Fail(AttemptError::from_stream_error(&error));
            }
            "response.output_text.delta" | "response.refusal.delta" | "response.function_call_arguments.delta" => {
                (data.get("delta").and_then(Value::as_str).is_some_and(|d| !d.is_empty()), false)
            }
            "response.output_item.added" => {
                (data.pointer("/item/type").and_then(Value::as_str) == Some("function_call"), false)
            }
            "response.completed" | "response.incomplete" => {
                self.done = true;
                (false, true)
            }
            _ => (false, false),
        };
        Parsed::Event(StreamEvent { data, content, end })
    }

    fn may_end(&self) -> bool {
        self.done
    }
}

/// Turns chat completion chunks into Responses stream events, as `(event type, data)`.
#[derive(Debug)]
pub struct FromChatStream {
    /// The request fields every Response object echoes back.
    echo: Map<String, Value>,
    sequence: u64,
    id: String,
    model: Value,
    started: bool,
    /// The output items so far: index → item.
    items: Vec<Value>,
    text_item: Option<usize>,
    calls: HashMap<u64, usize>,
    usage: Value,
    finish: Option<String>,
}

impl FromChatStream {
    /// A translator for the app's `request`.
    pub fn new(request: &ChatRequest) -> Self {
        FromChatStream {
            echo: echo(request),
            sequence: 0,
            id: "resp_backstop".into(),
            model: Value::Null,
            started: false,
            items: Vec::new(),
            text_item: None,
            calls: HashMap::new(),
            usage: Value::Null,
            finish: None,
        }
    }

    fn emit(&mut self, out: &mut Vec<(String, Value)>, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push((kind.to_string(), data));
    }

    fn snapshot(&self, status: &str) -> Value {
        let usage = if self.usage.is_null() { Value::Null } else { usage(&self.usage) };
        response_object(&self.id, &self.model, status, self.items.clone(), usage, &self.echo)
    }

    /// The events for one chunk.
    pub fn push(&mut self, chunk: &Value) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            self.id = response_id(chunk.get("id").and_then(Value::as_str));
            self.model = chunk.get("model").cloned().unwrap_or(Value::Null);
            let snapshot = self.snapshot("in_progress");
            self.emit(&mut out, "response.created", json!({"response": snapshot.clone()}));
            self.emit(&mut out, "response.in_progress", json!({"response": snapshot}));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = usage.clone();
        }
        let Some(choice) = chunk.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            let index = match self.text_item {
                Some(index) => index,
                None => {
                    let index = self.items.len();
                    let item = json!({"type": "message", "id": format!("msg_{}", self.id), "status": "in_progress", "role": "assistant", "content": []});
                    self.items.push(item.clone());
                    self.text_item = Some(index);
                    self.emit(&mut out, "response.output_item.added", json!({"output_index": index, "item": item}));
                    let part = json!({"type": "output_text", "text": "", "annotations": []});
                    self.items[index]["content"] = json!([part.clone()]);
                    let item_id = self.items[index]["id"].clone();
                    self.emit(
                        &mut out,
                        "response.content_part.added",
                        json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
                    );
                    index
                }
            };
            if let Value::String(so_far) = &mut self.items[index]["content"][0]["text"] {
                so_far.push_str(text);
            }
            let item_id = self.items[index]["id"].clone();
            self.emit(
                &mut out,
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
            );
        }
        for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let key = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let new_id = call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()).map(str::to_string);
            let reused = self.calls.get(&key).is_some_and(|index| {
                new_id.as_ref().is_some_and(|id| self.items[*index]["call_id"].as_str() != Some(id.as_str()))
            });
            let index = match self.calls.get(&key) {
                Some(index) if !reused => *index,
                _ => {
                    let index = self.items.len();
                    let item = json!({"type": "function_call", "id": format!("fc_{}_{key}", self.id),
                                      "call_id": new_id.clone().unwrap_or_else(|| format!("call_{}", self.items.len())),
                                      "name": call.pointer("/function/name").cloned().unwrap_or(json!("")),
                                      "arguments": "", "status": "in_progress"});
                    self.items.push(item.clone());
                    self.calls.insert(key, index);
                    self.emit(&mut out, "response.output_item.added", json!({"output_index": index, "item": item}));
                    index
                }
            };
            if let Some(arguments) =
                call.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty())
            {
                if let Value::String(so_far) = &mut self.items[index]["arguments"] {
                    so_far.push_str(arguments);
                }
                let item_id = self.items[index]["id"].clone();
                self.emit(
                    &mut out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": arguments}),
                );
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(finish.to_string());
        }
        out
    }

    /// The events that close the response.
    pub fn finish(&mut self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if !self.started {
            out.extend(self.push(&json!({})));
        }
        for index in 0..self.items.len() {
            let item_id = self.items[index]["id"].clone();
            if self.items[index]["type"] == "message" {
                let text = self.items[index]["content"][0]["text"].clone();
                self.emit(&mut out, "response.output_text.done", json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                let part = self.items[index]["content"][0].clone();
                self.emit(
                    &mut out,
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
                );
            } else {
                if self.items[index]["arguments"].as_str().is_none_or(str::is_empty) {
                    // A tool without input: `{}`, as OpenAI itself sends, never an empty string.
                    self.items[index]["arguments"] = json!("{}");
                }
                let arguments = self.items[index]["arguments"].clone();
                self.emit(
                    &mut out,
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "arguments": arguments}),
                );
            }
            self.items[index]["status"] = json!("completed");
            let item = self.items[index].clone();
            self.emit(&mut out, "response.output_item.done", json!({"output_index": index, "item": item}));
        }
        let (kind, status) = if self.finish.as_deref() == Some("length") {
            ("response.incomplete", "incomplete")
        } else {
            ("response.completed", "completed")
        };
        let mut snapshot = self.snapshot(status);
        if status == "incomplete" {
            snapshot["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        self.emit(&mut out, kind, json!({"response": snapshot}));
        out
    }
}

/// Turns a Responses stream from an `openai` target into chat chunks (for checks only: a
/// Responses stream only ever goes back to a Responses app untouched).
pub fn event_to_chunks(event: &Value) -> Vec<Value> {
    match event.get("type").and_then(Value::as_str) {
        Some("response.output_text.delta") => {
            vec![
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": event["delta"]}, "finish_reason": null}]}),
            ]
        }
        Some("response.completed") => {
            vec![
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_decides_eligibility() {
        let parse = |body: Value| from_responses_request(body.to_string().as_bytes()).expect("valid");
        let stateless = parse(json!({"model": "m", "input": "hi", "store": false}));
        assert!(stateless.origin.as_ref().is_some_and(|o| o.unportable.is_empty()));
        for stateful in [
            json!({"model": "m", "input": "hi"}),
            json!({"model": "m", "input": "hi", "store": false, "previous_response_id": "resp_1"}),
        ] {
            let request = parse(stateful);
            assert!(request.origin.as_ref().is_some_and(|o| o.unportable[0] == STATEFUL));
        }
    }

    #[test]
    fn tool_calls_get_ids_and_object_arguments() {
        let request = from_responses_request(br#"{"model": "m", "input": "hi", "store": false}"#).expect("valid");
        let mut t = FromChatStream::new(&request);
        let mut events = t.push(&json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "type": "function", "function": {"name": "now", "arguments": ""}}]}}]}));
        events.extend(t.finish());
        let done =
            events.iter().find(|(kind, _)| kind == "response.output_item.done").map(|(_, d)| d.clone()).expect("done");
        assert_eq!(done["item"]["arguments"], "{}");
        assert!(done["item"]["call_id"].as_str().is_some_and(|id| !id.is_empty()), "{done}");
        let sequence: Vec<u64> = events.iter().filter_map(|(_, d)| d["sequence_number"].as_u64()).collect();
        assert_eq!(sequence, (0..sequence.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_what_the_responses_api_would() {
        for (body, needle) in [
            (json!({"input": "hi"}), "model"),
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": []}), "input"),
            (json!({"model": "m", "input": [{"role": "wizard", "content": "x"}]}), "unknown role"),
        ] {
            let error = from_responses_request(body.to_string().as_bytes()).expect_err("invalid");
            assert!(error.message.contains(needle), "{body}: {}", error.message);
        }
    }
}
