//! Any bytes as a anthropic server-sent event stream, read and rendered for every ingress.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    backstop::fuzzing::stream_everywhere(backstop::llm::Api::Anthropic, data);
});
