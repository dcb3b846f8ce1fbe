//! Neutral chat chunks as Responses stream events (`response.created`, ...
//! `response.output_text.delta`, ... `response.completed`).

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::answer::{echo, response_id, response_object, usage};
use crate::llm::ChatRequest;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ingress::responses::parse::from_responses_request;

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
}
