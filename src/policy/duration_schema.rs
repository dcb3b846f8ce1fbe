//! The schema of every duration field of a policy: a string in Go's syntax
//! ([`crate::llm::go_duration`]) that the API server's CEL rules bound as the compiler does.

use schemars::{Schema, SchemaGenerator, json_schema};

/// The schema of a duration field: a string in Go's syntax that the API server checks is
/// positive and at most a day, the same limits the compiler applies.
pub fn schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 64,
        "pattern": r"^(([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|ms|s|m|h))+$",
        "x-kubernetes-validations": [
            {"rule": "duration(self) > duration('0s')", "message": "must be greater than zero"},
            {"rule": "duration(self) <= duration('24h')", "message": "must be at most 24h"},
        ],
    })
}

/// The schema of a period of at least ten seconds (a verification's `every`, a spend window),
/// which the compiler requires too.
pub fn at_least_10s(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 64,
        "pattern": r"^(([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|ms|s|m|h))+$",
        "x-kubernetes-validations": [
            {"rule": "duration(self) >= duration('10s')", "message": "must be at least 10s"},
            {"rule": "duration(self) <= duration('24h')", "message": "must be at most 24h"},
        ],
    })
}
