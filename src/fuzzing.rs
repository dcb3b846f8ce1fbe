//! Entry points for the fuzz targets in `fuzz/`: every request parser and stream translator,
//! driven with arbitrary input. They must never panic. Unit tests run them over the golden
//! fixtures, so they are built and exercised by the ordinary test run too.

use serde_json::{Value, json};

use crate::chain::{LocalKeys, compile};
use crate::llm::RequestFeature;
use crate::llm::{Api, ChatRequest, Operation};
use crate::policy::document::parse_policy;
use crate::provider::neutral::{self, ToOpenAiStream};
use crate::provider::sse::{Decoder, Parsed, WireStream};
use crate::provider::{anthropic, gemini, openai};
use crate::proxy::ingress::anthropic::{ToAnthropicStream, to_anthropic_message};
use crate::proxy::ingress::responses::ToResponsesStream;
use crate::proxy::ingress::responses::answer::from_chat_completion;

/// Translates a parsed request to every upstream format and asks every eligibility question.
pub fn translate_everywhere(request: &ChatRequest) {
    let _ = anthropic::to_wire::unsupported(request);
    let _ = anthropic::to_wire::to_messages_request(request, "model", 16);
    let _ = gemini::to_wire::unsupported(request);
    let _ = gemini::to_wire::to_gemini_request(request);
    let _ = openai::unsupported(request);
    let _ = crate::provider::openai::to_wire::encode(request, "model");
    let _ = request.input_texts();
    for feature in [RequestFeature::Tools, RequestFeature::Images, RequestFeature::StructuredOutput] {
        let _ = request.uses(feature);
    }
}

/// Reads `bytes` as an `api` event stream, split in two reads, and renders every event for
/// every ingress; also treats each event as a complete answer.
pub fn stream_everywhere(api: Api, bytes: &[u8]) {
    let request = ChatRequest {
        model: "chat".into(),
        messages: Vec::new(),
        stream: true,
        rest: serde_json::Map::new(),
        origin: None,
        operation: Operation::Chat,
        continues: false,
    };
    let mut parser: Box<dyn WireStream> = match api {
        Api::OpenAi => Box::new(openai::stream::ChunkParser::default()),
        Api::Anthropic => Box::new(anthropic::stream::EventParser::new(true)),
        Api::Gemini => Box::new(gemini::stream::EventParser::default()),
        Api::Responses => Box::new(openai::responses::EventParser::default()),
    };
    let mut to_openai = ToOpenAiStream::new(api, true);
    let mut to_anthropic = ToAnthropicStream::new(api);
    let mut to_responses = ToResponsesStream::new(api, &request);
    let mut decoder = Decoder::new(1 << 16);
    let (first, second) = bytes.split_at(bytes.len() / 2);
    for part in [first, second] {
        decoder.push(part);
        while let Ok(Some(event)) = decoder.next_event() {
            if api == Api::OpenAi {
                chat_chunk_read_alike(&event.data);
            }
            if let Parsed::Event(event) = parser.event(event) {
                let _ = to_openai.push(&event);
                let _ = to_anthropic.push(&event);
                let _ = to_responses.push(&event);
                let _ = neutral::to_openai_completion(api, event.data());
                let _ = to_anthropic_message(api, event.data().clone());
                let _ = from_chat_completion(&neutral::to_openai_completion(api, event.data()), &request);
            }
        }
    }
    let _ = decoder.finish();
    let _ = parser.may_end();
    let _ = to_openai.finish();
    let _ = to_anthropic.finish();
    let _ = to_responses.finish();
}

/// A chat chunk's text read in place gives what decoding it whole gives, and passes on to the
/// app as the same text.
fn chat_chunk_read_alike(text: &str) {
    assert!(openai::stream::readings_agree(text), "the chunk's readings disagree: {text}");
    assert!(crate::telemetry::genai::chat_readings_agree(text), "the chunk's facts disagree: {text}");
    assert!(neutral::answer_readings_agree(text.as_bytes()), "the answer's readings disagree: {text}");
    let mut decoder = Decoder::new(usize::MAX);
    decoder.push(&crate::proxy::relay::encode_text(None, text));
    let passed_on = decoder.next_event().ok().flatten().map(|event| event.data);
    assert_eq!(passed_on.as_deref(), Some(text), "the chunk's text is not passed on as it came");
}

/// Parses and compiles a policy document.
pub fn policy(text: &str) {
    if let Ok(policy) = parse_policy(text) {
        let _ = compile(&policy, &LocalKeys);
    }
}

/// A few hostile inputs the unit tests feed every entry point besides the fixtures.
pub fn hostile_inputs() -> Vec<Vec<u8>> {
    let deep = "[".repeat(200) + &"]".repeat(200);
    vec![
        Vec::new(),
        b"{}".to_vec(),
        b"data: {\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":18446744073709551615}}\n\n".to_vec(),
        b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":7,\"function\":{\"arguments\":\"x\"}}]}}]}\n\n".to_vec(),
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":18446744073709551615,\"cache_read_input_tokens\":9}}}\n\n".to_vec(),
        b"data: {\"type\":\"content_block_delta\",\"index\":99,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\"}}\n\n".to_vec(),
        json!({"model": "m", "messages": [{"role": "tool"}, {"role": "assistant", "tool_calls": "nope"}], "tools": [1, {"function": 2}], "stop": 3, "tool_choice": {"function": []}})
            .to_string()
            .into_bytes(),
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image", "source": 5}, {"type": "tool_result", "content": [1]}]}], "tools": [{"type": "web_search"}], "tool_choice": {"type": "tool"}})
            .to_string()
            .into_bytes(),
        json!({"model": "m", "input": [{"type": "function_call"}, {"type": "function_call_output", "output": {"a": 1}}, {"role": "user", "content": [{"type": "input_image"}]}], "text": {"format": {"type": "json_schema"}}})
            .to_string()
            .into_bytes(),
        // Chat chunks the in-place reading must leave to the whole one, or read alike.
        b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"delta\":{}}]}\n\n".to_vec(),
        b"data: {\"choices\":[[null,\"stop\"]],\"usage\":[]}\n\n".to_vec(),
        b"data: {\"id\":\ndata:  \"c\",\"choices\":[],\r\ndata: \"usage\":{\"prompt_tokens\":1}}\n\n".to_vec(),
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\\\"\\u00e9\"},\"finish_reason\":\"st\\u006fp\"}]}\n\n".to_vec(),
        b"data: {\"choices\":[{\"message\":{\"content\":null},\"finish_reason\":\"content_filter\"},{\"message\":[]}]}\n\n".to_vec(),
        b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\ud83d\"}}]}}]}\n\n".to_vec(),
        b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"created\":1e400}\n\n".to_vec(),
        deep.into_bytes(),
        Value::String("\u{0}\u{ffff}".into()).to_string().into_bytes(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ingress::anthropic::parse::from_messages_request;
    use crate::proxy::ingress::responses::parse::from_responses_request;

    fn fixtures() -> Vec<Vec<u8>> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .map(|entries| entries.flatten().filter_map(|e| std::fs::read(e.path()).ok()).collect())
            .unwrap_or_default();
        assert!(inputs.len() >= 8, "the fixtures seed the fuzzers");
        inputs.extend(hostile_inputs());
        inputs
    }

    #[test]
    fn every_entry_point_survives_the_seeds() {
        for input in fixtures() {
            if let Ok(request) = crate::proxy::ingress::openai::parse_chat(&input) {
                translate_everywhere(&request);
            }
            if let Ok(request) = from_messages_request(&input) {
                translate_everywhere(&request);
            }
            if let Ok(request) = from_responses_request(&input) {
                translate_everywhere(&request);
            }
            if let Ok(request) = crate::proxy::ingress::embeddings::parse(&input) {
                translate_everywhere(&request);
            }
            for api in [Api::OpenAi, Api::Anthropic, Api::Gemini, Api::Responses] {
                stream_everywhere(api, &input);
            }
            policy(&String::from_utf8_lossy(&input));
        }
        policy(include_str!("../deploy/examples/quickstart.yaml"));
    }
}
