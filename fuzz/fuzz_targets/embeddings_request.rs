//! Any bytes as an OpenAI embeddings request: parse, then translate to every upstream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = backstop::llm::ChatRequest::from_openai_embeddings_json(data) {
        backstop::fuzzing::translate_everywhere(&request);
    }
});
