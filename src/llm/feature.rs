//! Kinds of requests, as a policy's `skipFor` names them: what a request uses that some targets
//! serve poorly.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A kind of request a target can be kept out of with `skipFor`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RequestFeature {
    /// Requests that offer the model tools (function calling).
    Tools,
    /// Requests with image input.
    Images,
    /// Requests for JSON output (`response_format` of `json_object` or `json_schema`).
    StructuredOutput,
}

impl RequestFeature {
    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestFeature::Tools => "tools",
            RequestFeature::Images => "images",
            RequestFeature::StructuredOutput => "structuredOutput",
        }
    }
}
