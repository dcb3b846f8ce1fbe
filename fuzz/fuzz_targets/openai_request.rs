//! Any bytes as an OpenAI Chat Completions request: parse, then translate to every upstream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = backstop::proxy::ingress::openai::parse_chat(data) {
        backstop::fuzzing::translate_everywhere(&request);
    }
});
