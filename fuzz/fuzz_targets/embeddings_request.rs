//! Any bytes as an OpenAI embeddings request: parse, then translate to every upstream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = backstop::proxy::ingress::embeddings::parse(data) {
        backstop::fuzzing::translate_everywhere(&request);
    }
});
