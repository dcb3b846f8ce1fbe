//! Neutral chat chunks as Messages stream events.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::answer::stop_reason;

/// Turns OpenAI `chat.completion.chunk`s into Messages stream events, as `(event name, data)`.
#[derive(Debug, Default)]
pub struct FromOpenAiStream {
    started: bool,
    open: Option<u64>,
    next_block: u64,
    tools: HashMap<u64, u64>,
    tool_ids: HashMap<u64, String>,
    stop_reason: Option<&'static str>,
    input_tokens: u64,
    output_tokens: u64,
}

impl FromOpenAiStream {
    /// A fresh translator.
    pub fn new() -> Self {
        FromOpenAiStream::default()
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<(&'static str, Value)>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = chunk.get("id").and_then(Value::as_str).unwrap_or("msg");
        out.push((
            "message_start",
            json!({"type": "message_start", "message": {
                "id": if id.starts_with("msg_") { id.to_string() } else { format!("msg_{id}") },
                "type": "message", "role": "assistant", "model": chunk.get("model").cloned().unwrap_or(Value::Null),
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
            }}),
        ));
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if let Some(index) = self.open.take() {
            out.push(("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        }
    }

    /// The events for one chunk.
    pub fn push(&mut self, chunk: &Value) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.input_tokens = usage.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(self.input_tokens);
            self.output_tokens = usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(self.output_tokens);
        }
        self.start(chunk, &mut out);
        let Some(choice) = chunk.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            if self.open.is_none_or(|index| self.tools.values().any(|t| *t == index)) {
                self.close(&mut out);
                let index = self.next_block;
                self.next_block += 1;
                self.open = Some(index);
                out.push((
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
                ));
            }
            let index = self.open.unwrap_or(0);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let openai_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let new_id = call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
            let known = self.tools.contains_key(&openai_index);
            // Some servers number every parallel call 0: a new id is a new call all the same.
            let reused = known && new_id.is_some() && self.tool_ids.get(&openai_index).map(String::as_str) != new_id;
            if let Some(id) = new_id {
                self.tool_ids.insert(openai_index, id.to_string());
            }
            if !known || reused {
                self.close(&mut out);
                let index = self.next_block;
                self.next_block += 1;
                self.tools.insert(openai_index, index);
                self.open = Some(index);
                out.push((
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": {
                        "type": "tool_use", "id": call.get("id").cloned().unwrap_or(json!("")),
                        "name": call.pointer("/function/name").cloned().unwrap_or(json!("")), "input": {}}}),
                ));
            }
            let index = self.tools[&openai_index];
            if let Some(arguments) =
                call.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty())
            {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                ));
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(stop_reason(Some(finish)));
        }
        out
    }

    /// The events that close the message.
    pub fn finish(&mut self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        self.start(&json!({}), &mut out);
        self.close(&mut out);
        out.push((
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_tool_index_with_a_new_id_is_a_new_block() {
        let mut t = FromOpenAiStream::new();
        let call = |id: &str, args: &str| {
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": id, "type": "function", "function": {"name": "f", "arguments": args}}]}}]})
        };
        let mut events = t.push(&call("call_a", "{}"));
        events.extend(t.push(&call("call_b", "{}")));
        events.extend(t.finish());
        let starts: Vec<&Value> = events.iter().filter(|(n, _)| *n == "content_block_start").map(|(_, d)| d).collect();
        assert_eq!(starts.len(), 2, "{events:?}");
        assert_eq!(starts[1]["content_block"]["id"], "call_b");
        assert_eq!(starts[1]["index"], 1);
    }
}
