//! Any bytes as a policy file: parse and compile, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        backstop::fuzzing::policy(text);
    }
});
