//! Golden fixtures for every translation direction, streaming and not, with tools: inputs in
//! `tests/fixtures/`, expected outputs as insta snapshots beside this file.

use backstop::llm::{Api, ChatRequest, StreamEvent};
use backstop::provider::neutral::ToOpenAiStream;
use backstop::provider::sse::{Decoder, Parsed, WireStream};
use backstop::provider::{anthropic, gemini, openai};
use backstop::proxy::ingress::anthropic as anthropic_ingress;
use backstop::proxy::ingress::anthropic::ToAnthropicStream;
use backstop::proxy::ingress::named::{FromChat, ToNamedEvents};
use backstop::proxy::ingress::responses as responses_ingress;
use backstop::proxy::ingress::responses::ToResponsesStream;
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect("fixture JSON")
}

/// Reads an SSE fixture through a provider's stream parser, as the sidecar does.
fn events(name: &str, mut parser: impl WireStream) -> Vec<StreamEvent> {
    let mut decoder = Decoder::new(1 << 20);
    decoder.push(fixture(name).as_bytes());
    let mut out = Vec::new();
    while let Some(event) = decoder.next_event().expect("event size") {
        match parser.event(event) {
            Parsed::Event(event) => out.push(event),
            Parsed::Skip => {}
            Parsed::End => break,
            Parsed::Fail(error) => panic!("fixture event failed: {error}"),
        }
    }
    assert!(parser.may_end(), "{name} ends where the provider's stream may end");
    out
}

/// Renders stream events into a named-event API, the end included, as `{event, data}` values.
fn named_events<T: FromChat>(translate: &mut ToNamedEvents<T>, events: &[StreamEvent]) -> Vec<Value> {
    let mut out: Vec<(String, Value)> = events.iter().flat_map(|e| translate.push(e)).collect();
    out.extend(translate.finish());
    out.into_iter().map(|(name, data)| json!({"event": name, "data": data})).collect()
}

fn openai_request() -> ChatRequest {
    backstop::proxy::ingress::openai::parse_chat(fixture("openai_request_tools.json").as_bytes())
        .expect("valid request")
}

#[test]
fn openai_request_to_anthropic() {
    let request = openai_request();
    assert_eq!(anthropic::to_wire::unsupported(&request), None);
    insta::assert_json_snapshot!(anthropic::to_wire::to_messages_request(&request, "claude-sonnet-4-5", 4096));
    let mut streaming = request;
    streaming.stream = true;
    streaming.rest.remove("max_tokens");
    let body = anthropic::to_wire::to_messages_request(&streaming, "claude-sonnet-4-5", 1024);
    assert_eq!(
        (body["stream"].clone(), body["max_tokens"].clone()),
        (json!(true), json!(1024)),
        "the policy default fills max_tokens"
    );
}

#[test]
fn openai_request_to_gemini() {
    let mut request = openai_request();
    assert!(
        gemini::to_wire::unsupported(&request).is_some_and(|why| why.contains("parallel_tool_calls")),
        "Gemini cannot promise one call"
    );
    request.rest.remove("parallel_tool_calls");
    assert_eq!(gemini::to_wire::unsupported(&request), None);
    insta::assert_json_snapshot!(gemini::to_wire::to_gemini_request(&request));
}

#[test]
fn anthropic_request_to_neutral_and_back() {
    let body = fixture("anthropic_request_tools.json");
    let request = anthropic_ingress::parse::from_messages_request(body.as_bytes()).expect("valid Messages request");
    insta::assert_json_snapshot!(
        "anthropic_request_to_neutral",
        json!({"messages": request.messages, "rest": request.rest, "stream": request.stream})
    );
    // To an Anthropic target the app's own body goes through untouched but for the model.
    let mut original: Value = serde_json::from_str(&body).expect("json");
    original["model"] = json!("claude-opus-4-1");
    assert_eq!(anthropic::to_wire::to_messages_request(&request, "claude-opus-4-1", 4096), original);
    // To an OpenAI or Gemini target, the neutral form.
    assert_eq!(openai::unsupported(&request), None);
    insta::assert_json_snapshot!("anthropic_request_to_gemini", gemini::to_wire::to_gemini_request(&request));
}

#[test]
fn anthropic_message_to_openai() {
    insta::assert_json_snapshot!(anthropic::from_wire::to_openai_completion(&json_fixture("anthropic_message_tools.json")), {".created" => "[created]"});
}

#[test]
fn gemini_response_to_openai() {
    insta::assert_json_snapshot!(gemini::from_wire::to_openai_completion(&json_fixture("gemini_response_tools.json")), {".created" => "[created]"});
}

#[test]
fn openai_completion_to_anthropic() {
    insta::assert_json_snapshot!(anthropic_ingress::answer::from_openai_completion(&json_fixture(
        "openai_completion_tools.json"
    )));
}

#[test]
fn anthropic_stream_to_openai_chunks() {
    let mut translate = ToOpenAiStream::new(Api::Anthropic, true);
    let events = events("anthropic_stream_tools.sse", anthropic::stream::EventParser::new(true));
    let mut chunks: Vec<Value> = events.iter().flat_map(|e| translate.push(e)).collect();
    chunks.extend(translate.finish());
    insta::assert_json_snapshot!(chunks, {"[].created" => "[created]"});
}

#[test]
fn gemini_stream_to_openai_chunks() {
    let mut translate = ToOpenAiStream::new(Api::Gemini, true);
    let events = events("gemini_stream_tools.sse", gemini::stream::EventParser::default());
    let mut chunks: Vec<Value> = events.iter().flat_map(|e| translate.push(e)).collect();
    chunks.extend(translate.finish());
    insta::assert_json_snapshot!(chunks, {"[].created" => "[created]"});
}

#[test]
fn openai_stream_to_anthropic_events() {
    let mut translate = ToAnthropicStream::new(Api::OpenAi);
    let events = events("openai_stream_tools.sse", openai::stream::ChunkParser::default());
    let out = named_events(&mut translate, &events);
    insta::assert_json_snapshot!(out);
}

#[test]
fn gemini_stream_to_anthropic_events() {
    let mut translate = ToAnthropicStream::new(Api::Gemini);
    let events = events("gemini_stream_tools.sse", gemini::stream::EventParser::default());
    let out = named_events(&mut translate, &events);
    insta::assert_json_snapshot!(out);
}

#[test]
fn anthropic_stream_passes_through_to_anthropic_apps() {
    let mut translate = ToAnthropicStream::new(Api::Anthropic);
    let events = events("anthropic_stream_tools.sse", anthropic::stream::EventParser::new(true));
    let names: Vec<String> = events.iter().flat_map(|e| translate.push(e)).map(|(name, _)| name).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert_eq!(names.len(), 12, "every event, the ping included, as Anthropic sent them: {names:?}");
}

#[test]
fn responses_request_to_neutral_and_anthropic() {
    let request = responses_ingress::parse::from_responses_request(fixture("responses_request_tools.json").as_bytes())
        .expect("valid Responses request");
    insta::assert_json_snapshot!(
        "responses_request_to_neutral",
        json!({"messages": request.messages, "rest": request.rest, "stream": request.stream})
    );
    assert!(
        anthropic::to_wire::unsupported(&request).is_some_and(|why| why.contains("response_format")),
        "JSON schema output is not portable to Messages"
    );
    assert_eq!(gemini::to_wire::unsupported(&request), None);
    insta::assert_json_snapshot!("responses_request_to_gemini", gemini::to_wire::to_gemini_request(&request));
}

#[test]
fn chat_completion_to_response_object() {
    let request = responses_ingress::parse::from_responses_request(fixture("responses_request_tools.json").as_bytes())
        .expect("valid");
    let response =
        responses_ingress::answer::from_chat_completion(&json_fixture("openai_completion_tools.json"), &request);
    insta::assert_json_snapshot!(response, {".created_at" => "[created]"});
}

#[test]
fn anthropic_stream_to_responses_events() {
    let request = responses_ingress::parse::from_responses_request(fixture("responses_request_tools.json").as_bytes())
        .expect("valid");
    let mut translate = ToResponsesStream::new(Api::Anthropic, &request);
    let events = events("anthropic_stream_tools.sse", anthropic::stream::EventParser::new(true));
    let out = named_events(&mut translate, &events);
    insta::assert_json_snapshot!(out, {"[].data.response.created_at" => "[created]"});
}

#[test]
fn gemini_response_to_anthropic() {
    insta::assert_json_snapshot!(anthropic_ingress::to_anthropic_message(
        Api::Gemini,
        json_fixture("gemini_response_tools.json")
    ));
}

/// A policy adapting one target of each API; returns each target's adaptation by provider.
fn adaptations() -> std::collections::BTreeMap<String, backstop::chain::Adaptation> {
    let policy = backstop::policy::document::parse_policy(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: adapted}
spec:
  providers:
    - {name: oai, type: openai, apiKey: {value: sk-test}}
    - {name: claude, type: anthropic, apiKey: {value: sk-ant-test}}
    - {name: gem, type: gemini, apiKey: {value: g-test}}
  routes:
    - model: chat
      chain:
        - provider: oai
          model: gpt-5
          adapt:
            set: {reasoningEffort: low, seed: 7}
            cap: {maxTokens: 256}
            remove: [temperature, topP]
            systemPrompt: {prefix: "You are the shop's assistant.", suffix: "Answer in under 100 words."}
        - provider: claude
          model: claude-sonnet-4-5
          adapt:
            set: {thinkingBudget: 2048}
            cap: {maxTokens: 300}
            remove: [temperature, topK]
            systemPrompt: {suffix: "Return tool arguments as strict JSON."}
        - provider: gem
          model: gemini-2.5-flash
          adapt:
            set: {thinkingBudget: 0, topK: 20}
            cap: {temperature: 0.4, maxTokens: 200}
            remove: [seed]
            systemPrompt: {prefix: "Use plain text."}
"#,
    )
    .expect("policy parses");
    let compiled = backstop::chain::compile(&policy, &backstop::chain::LocalKeys).expect("policy compiles");
    compiled
        .targets()
        .into_iter()
        .map(|t| (compiled.providers[t.provider].name.clone(), t.adapt.clone().expect("adapted")))
        .collect()
}

fn adapted(adaptation: &backstop::chain::Adaptation, wire: backstop::provider::adapt::Wire, body: Value) -> Value {
    let Value::Object(mut body) = body else { panic!("a request body is an object") };
    backstop::provider::adapt::apply(adaptation, wire, &mut body);
    Value::Object(body)
}

#[test]
fn adaptation_of_an_openai_request_at_each_target() {
    use backstop::provider::adapt::Wire;
    let adapt = adaptations();
    let mut request = openai_request();
    request.rest.remove("parallel_tool_calls");
    let openai_body: Value =
        serde_json::from_slice(&backstop::provider::openai::to_wire::encode(&request, "gpt-5").expect("encodes"))
            .expect("json");
    insta::assert_json_snapshot!(json!({
        "openai": adapted(&adapt["oai"], Wire::Chat { completion_tokens: true }, openai_body),
        "anthropic": adapted(&adapt["claude"], Wire::Messages, anthropic::to_wire::to_messages_request(&request, "claude-sonnet-4-5", 4096)),
        "gemini": adapted(&adapt["gem"], Wire::Gemini, gemini::to_wire::to_gemini_request(&request)),
    }));
}

#[test]
fn adaptation_of_an_anthropic_request_at_each_target() {
    use backstop::provider::adapt::Wire;
    let adapt = adaptations();
    let request = anthropic_ingress::parse::from_messages_request(fixture("anthropic_request_tools.json").as_bytes())
        .expect("valid Messages request");
    let openai_body: Value =
        serde_json::from_slice(&backstop::provider::openai::to_wire::encode(&request, "gpt-5").expect("encodes"))
            .expect("json");
    insta::assert_json_snapshot!(json!({
        "anthropic": adapted(&adapt["claude"], Wire::Messages, anthropic::to_wire::to_messages_request(&request, "claude-sonnet-4-5", 4096)),
        "openai": adapted(&adapt["oai"], Wire::Chat { completion_tokens: true }, openai_body),
        "gemini": adapted(&adapt["gem"], Wire::Gemini, gemini::to_wire::to_gemini_request(&request)),
    }));
}

#[test]
fn adaptation_of_a_stateful_responses_request_at_openai() {
    use backstop::provider::adapt::Wire;
    let adapt = adaptations();
    let mut body = json_fixture("responses_request_tools.json");
    body["model"] = json!("gpt-5");
    insta::assert_json_snapshot!(adapted(&adapt["oai"], Wire::Responses, body));
}
