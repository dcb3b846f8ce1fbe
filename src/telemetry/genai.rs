//! What an answer says about itself, in every provider's wire format: its id, the model that
//! answered, why it finished and the tokens it was billed for; read from a whole answer or
//! gathered from a stream's events. Telemetry reads it, never the text.

use serde_json::Value;

use crate::llm::view::{ChatView, Object};
use crate::llm::{Api, StreamEvent, Whole};

/// An answer's facts, as the GenAI conventions name them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnswerInfo {
    /// `gen_ai.response.id`.
    pub id: Option<String>,
    /// `gen_ai.response.model`.
    pub model: Option<String>,
    /// `gen_ai.response.finish_reasons`.
    pub finish_reasons: Vec<String>,
    /// `gen_ai.usage.input_tokens` (cached ones included).
    pub input_tokens: Option<u64>,
    /// `gen_ai.usage.output_tokens`.
    pub output_tokens: Option<u64>,
    /// `gen_ai.usage.cache_read.input_tokens`: input tokens read from the provider's prompt
    /// cache.
    pub cached_tokens: Option<u64>,
    /// `gen_ai.usage.cache_creation.input_tokens`: input tokens written to it (Anthropic).
    pub cache_written_tokens: Option<u64>,
}

fn text(value: &Value) -> Option<&str> {
    value.as_str().filter(|s| !s.is_empty())
}

/// Keeps the latest `value` in `slot`, copied only when it changes (a stream repeats its `id` and
/// `model` in every event).
fn keep(slot: &mut Option<String>, value: Option<&str>) {
    if let Some(value) = value
        && slot.as_deref() != Some(value)
    {
        *slot = Some(value.to_string());
    }
}

fn number(value: &Value) -> Option<u64> {
    value.as_u64()
}

impl AnswerInfo {
    /// The facts of a whole answer in `api`'s format.
    pub fn of_complete(api: Api, body: &Value) -> AnswerInfo {
        let mut info = AnswerInfo::default();
        match api {
            Api::Responses => info.responses(body),
            other => info.observe(other, body),
        }
        info
    }

    fn finish(&mut self, reason: Option<&str>) {
        if let Some(reason) = reason
            && !self.finish_reasons.iter().any(|known| known == reason)
        {
            self.finish_reasons.push(reason.to_string());
        }
    }

    fn responses(&mut self, response: &Value) {
        keep(&mut self.id, text(&response["id"]));
        keep(&mut self.model, text(&response["model"]));
        let status = text(&response["status"]).filter(|s| *s != "in_progress");
        self.finish(status);
        let usage = &response["usage"];
        self.input_tokens = number(&usage["input_tokens"]).or(self.input_tokens);
        self.output_tokens = number(&usage["output_tokens"]).or(self.output_tokens);
        self.cached_tokens = number(&usage["input_tokens_details"]["cached_tokens"]).or(self.cached_tokens);
    }

    /// The facts of a whole answer in `api`'s format; a usual chat answer not decoded is read in
    /// place.
    pub fn of_whole(api: Api, answer: &Whole) -> AnswerInfo {
        let undecoded = answer.raw.as_deref().filter(|_| api == Api::OpenAi && answer.json_if_decoded().is_none());
        match undecoded.and_then(ChatView::reread_bytes) {
            Some(view) => {
                let mut info = AnswerInfo::default();
                info.chunk(&view);
                info
            }
            None => AnswerInfo::of_complete(api, answer.json()),
        }
    }

    /// Gathers what one stream event in `api`'s format says; a usual chat chunk is read in
    /// place.
    pub fn observe_event(&mut self, api: Api, event: &StreamEvent) {
        match event.text().filter(|_| api == Api::OpenAi).and_then(ChatView::reread) {
            Some(chunk) => self.chunk(&chunk),
            None => self.observe(api, event.data()),
        }
    }

    fn chunk(&mut self, chunk: &ChatView<'_>) {
        keep(&mut self.id, chunk.id.filter(|s| !s.is_empty()));
        keep(&mut self.model, chunk.model.filter(|s| !s.is_empty()));
        for reason in chunk.finish_reasons() {
            self.finish(Some(reason));
        }
        if let Some(Object(usage)) = &chunk.usage {
            self.input_tokens = usage.prompt_tokens.or(self.input_tokens);
            self.output_tokens = usage.completion_tokens.or(self.output_tokens);
            self.cached_tokens = usage.cached_tokens().or(self.cached_tokens);
        }
    }

    /// Gathers what one stream event (or a whole answer) in `api`'s format says.
    pub fn observe(&mut self, api: Api, event: &Value) {
        match api {
            Api::OpenAi => {
                keep(&mut self.id, text(&event["id"]));
                keep(&mut self.model, text(&event["model"]));
                for choice in event["choices"].as_array().into_iter().flatten() {
                    self.finish(text(&choice["finish_reason"]));
                }
                let usage = &event["usage"];
                self.input_tokens = number(&usage["prompt_tokens"]).or(self.input_tokens);
                self.output_tokens = number(&usage["completion_tokens"]).or(self.output_tokens);
                self.cached_tokens = number(&usage["prompt_tokens_details"]["cached_tokens"]).or(self.cached_tokens);
            }
            Api::Anthropic => {
                // A whole message, or `message_start` (which holds one) and `message_delta`.
                let message = if event["type"] == "message_start" { &event["message"] } else { event };
                keep(&mut self.id, text(&message["id"]));
                keep(&mut self.model, text(&message["model"]));
                self.finish(text(&message["stop_reason"]).or_else(|| text(&event["delta"]["stop_reason"])));
                let usage = &message["usage"];
                let input = number(&usage["input_tokens"]);
                let cached = number(&usage["cache_read_input_tokens"]);
                let created = number(&usage["cache_creation_input_tokens"]);
                if let Some(input) = input {
                    self.input_tokens = Some(input + cached.unwrap_or(0) + created.unwrap_or(0));
                }
                self.cached_tokens = cached.or(self.cached_tokens);
                self.cache_written_tokens = created.or(self.cache_written_tokens);
                self.output_tokens = number(&usage["output_tokens"]).or(self.output_tokens);
            }
            Api::Gemini => {
                keep(&mut self.id, text(&event["responseId"]));
                keep(&mut self.model, text(&event["modelVersion"]));
                for candidate in event["candidates"].as_array().into_iter().flatten() {
                    self.finish(text(&candidate["finishReason"]));
                }
                let usage = &event["usageMetadata"];
                self.input_tokens = number(&usage["promptTokenCount"]).or(self.input_tokens);
                // Thinking is billed as output, and the app is shown it as completion tokens.
                let (answer, thoughts) = (number(&usage["candidatesTokenCount"]), number(&usage["thoughtsTokenCount"]));
                if answer.is_some() || thoughts.is_some() {
                    self.output_tokens = Some(answer.unwrap_or(0) + thoughts.unwrap_or(0));
                }
                self.cached_tokens = number(&usage["cachedContentTokenCount"]).or(self.cached_tokens);
            }
            Api::Responses => {
                if let Some(response) = event.get("response") {
                    self.responses(response);
                }
            }
        }
    }

    /// What the answer cost, in US dollars, at `price` per million tokens; `None` without a
    /// price or without usage.
    pub fn cost(&self, price: Option<&crate::chain::Price>) -> Option<f64> {
        let price = price?;
        let (input, output) = (self.input_tokens?, self.output_tokens.unwrap_or(0));
        let cached = self.cached_tokens.unwrap_or(0).min(input);
        let written = self.cache_written_tokens.unwrap_or(0).min(input - cached);
        let cached_price = price.cached_input.unwrap_or(price.input);
        let write_price = price.cache_write.unwrap_or(price.input * crate::chain::CACHE_WRITE_MARKUP);
        let plain = input - cached - written;
        Some(
            (plain as f64 * price.input
                + cached as f64 * cached_price
                + written as f64 * write_price
                + output as f64 * price.output)
                / 1e6,
        )
    }
}

/// Whether a chat chunk's facts read in place are those decoding it whole gives (when it is
/// read in place at all). The fuzz target checks it on any input.
pub fn chat_readings_agree(text: &str) -> bool {
    // Only text the chunk parser took is kept as text.
    if ChatView::read(text).is_none() {
        return true;
    }
    let Ok(whole) = serde_json::from_str::<Value>(text) else { return false };
    let (mut in_place, mut decoded) = (AnswerInfo::default(), AnswerInfo::default());
    in_place.observe_event(Api::OpenAi, &StreamEvent::from_text(text.to_string(), false, false, false));
    decoded.observe(Api::OpenAi, &whole);
    in_place == decoded
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::chain::Price;

    #[test]
    fn every_wire_format_gives_its_id_model_finish_and_usage() {
        let openai = json!({"id": "chatcmpl-1", "model": "gpt-4o-2024-08-06", "choices": [{"finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 100}}});
        let info = AnswerInfo::of_complete(Api::OpenAi, &openai);
        assert_eq!(
            info,
            AnswerInfo {
                id: Some("chatcmpl-1".into()),
                model: Some("gpt-4o-2024-08-06".into()),
                finish_reasons: vec!["stop".into()],
                input_tokens: Some(120),
                output_tokens: Some(30),
                cached_tokens: Some(100),
                cache_written_tokens: None,
            }
        );
        let anthropic = json!({"id": "msg_1", "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 30, "output_tokens": 7}});
        let info = AnswerInfo::of_complete(Api::Anthropic, &anthropic);
        assert_eq!(
            (info.input_tokens, info.cached_tokens, info.cache_written_tokens, info.output_tokens),
            (Some(150), Some(100), Some(30), Some(7))
        );
        assert_eq!(info.finish_reasons, ["end_turn"]);
        let gemini = json!({"responseId": "r1", "modelVersion": "gemini-2.5-flash", "candidates": [{"finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4}});
        assert_eq!(AnswerInfo::of_complete(Api::Gemini, &gemini).output_tokens, Some(4));
        let thinking = json!({"candidates": [{"finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4, "thoughtsTokenCount": 120}});
        assert_eq!(
            AnswerInfo::of_complete(Api::Gemini, &thinking).output_tokens,
            Some(124),
            "thinking is billed as output, as the app is shown it"
        );
        let responses = json!({"id": "resp_1", "model": "gpt-4o", "status": "completed",
            "usage": {"input_tokens": 5, "output_tokens": 6, "input_tokens_details": {"cached_tokens": 0}}});
        let info = AnswerInfo::of_complete(Api::Responses, &responses);
        assert_eq!(
            (info.id.as_deref(), info.finish_reasons.as_slice(), info.output_tokens),
            (Some("resp_1"), &["completed".to_string()][..], Some(6))
        );
    }

    #[test]
    fn streams_are_gathered_event_by_event() {
        let mut info = AnswerInfo::default();
        for event in [
            json!({"type": "message_start", "message": {"id": "msg_2", "model": "claude-haiku-4-5", "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 64}}),
        ] {
            info.observe(Api::Anthropic, &event);
        }
        assert_eq!((info.id.as_deref(), info.input_tokens, info.output_tokens), (Some("msg_2"), Some(11), Some(64)));
        assert_eq!(info.finish_reasons, ["max_tokens"]);
        let mut info = AnswerInfo::default();
        info.observe(
            Api::OpenAi,
            &json!({"id": "c", "model": "m", "choices": [{"delta": {"content": "x"}, "finish_reason": null}]}),
        );
        info.observe(
            Api::OpenAi,
            &json!({"id": "c", "model": "m", "choices": [{"delta": {}, "finish_reason": "stop"}]}),
        );
        info.observe(
            Api::OpenAi,
            &json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        );
        assert_eq!((info.finish_reasons.as_slice(), info.output_tokens), (&["stop".to_string()][..], Some(2)));
    }

    #[test]
    fn chat_chunks_read_in_place_give_what_decoding_them_gives() {
        let chunks = [
            json!({"id": "c", "model": "m", "choices": [{"delta": {"content": "x"}, "finish_reason": null}]}),
            json!({"id": "c2", "model": "", "choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 1}}}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "prompt_tokens_details": null}}),
        ];
        let (mut in_place, mut decoded) = (AnswerInfo::default(), AnswerInfo::default());
        for chunk in &chunks {
            let event = StreamEvent::from_text(chunk.to_string(), false, false, false);
            assert!(ChatView::read(event.text().expect("text")).is_some(), "read in place: {chunk}");
            in_place.observe_event(Api::OpenAi, &event);
            decoded.observe(Api::OpenAi, chunk);
            assert!(chat_readings_agree(&chunk.to_string()), "{chunk}");
        }
        assert_eq!(in_place, decoded);
        assert_eq!(
            (in_place.id.as_deref(), in_place.model.as_deref(), in_place.finish_reasons.len(), in_place.cached_tokens),
            (Some("c2"), Some("m"), 2, Some(1))
        );
    }

    #[test]
    fn cost_bills_cached_input_at_its_own_price() {
        let info = AnswerInfo {
            input_tokens: Some(1_000_000),
            cached_tokens: Some(400_000),
            output_tokens: Some(100_000),
            ..AnswerInfo::default()
        };
        let price = Price { input: 2.5, output: 10.0, cached_input: Some(1.25), cache_write: None };
        let cost = info.cost(Some(&price)).expect("priced");
        assert!((cost - (0.6 * 2.5 + 0.4 * 1.25 + 0.1 * 10.0)).abs() < 1e-9, "{cost}");
        assert_eq!(info.cost(None), None);
        assert_eq!(AnswerInfo::default().cost(Some(&price)), None, "no usage, no cost");
    }

    #[test]
    fn cost_bills_cache_writes_at_anthropic_s_markup_unless_priced() {
        // Anthropic: 20 plain input tokens, 100 read from the cache, 30 written to it.
        let message = json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude",
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 30, "output_tokens": 7}}});
        let info = AnswerInfo::of_complete(Api::Anthropic, &message);
        let price = Price { input: 3.0, output: 15.0, cached_input: Some(0.3), cache_write: None };
        let cost = info.cost(Some(&price)).expect("priced");
        let expected = (20.0 * 3.0 + 100.0 * 0.3 + 30.0 * 3.75 + 7.0 * 15.0) / 1e6;
        assert!((cost - expected).abs() < 1e-12, "{cost} against {expected}");
        let one_hour = Price { cache_write: Some(6.0), ..price };
        let cost = info.cost(Some(&one_hour)).expect("priced");
        let expected = (20.0 * 3.0 + 100.0 * 0.3 + 30.0 * 6.0 + 7.0 * 15.0) / 1e6;
        assert!((cost - expected).abs() < 1e-12, "{cost} against {expected}");
    }
}
