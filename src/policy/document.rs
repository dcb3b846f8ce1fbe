//! A `FallbackPolicy` YAML document read into the CRD types, with the field path of any
//! schema problem taken from the deserializer itself (`serde_path_to_error`), so that every
//! policy error, schema or compile, reads `` `spec.routes[0].chain[1]`: ... ``.

use serde_path_to_error::Segment;

use super::{API_VERSION, FallbackPolicy};

/// Why a document is not a `FallbackPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// Not YAML, or not a mapping with `apiVersion` and `kind`.
    #[error("not a FallbackPolicy document: {0}")]
    NotADocument(String),
    /// Another API version.
    #[error("`apiVersion`: must be `{API_VERSION}`, found `{0}`")]
    ApiVersion(String),
    /// Another kind.
    #[error("`kind`: must be `FallbackPolicy`, found `{0}`")]
    Kind(String),
    /// A field that does not fit the schema.
    #[error("`{path}`: {problem}")]
    Field {
        /// Where, such as `spec.routes[0].chain[1]`.
        path: String,
        /// What is wrong there.
        problem: String,
    },
}

/// Parses one `FallbackPolicy` YAML document, naming the field path of a schema error
/// (for example `` `spec.routes[0].chain[1]`: unknown field `modle` ``).
pub fn parse_policy(yaml: &str) -> Result<FallbackPolicy, DocumentError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Types {
        api_version: Option<String>,
        kind: Option<String>,
    }
    let types: Types = serde_yaml_ng::from_str(yaml).map_err(|e| DocumentError::NotADocument(e.to_string()))?;
    let api_version = types.api_version.unwrap_or_default();
    if api_version != API_VERSION {
        return Err(DocumentError::ApiVersion(api_version));
    }
    let kind = types.kind.unwrap_or_default();
    if kind != "FallbackPolicy" {
        return Err(DocumentError::Kind(kind));
    }
    serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(yaml)).map_err(|error| {
        let path = error.path();
        // A key written straight into `apiKey` would be echoed by "invalid type: string ...":
        // never repeat what stands under a key field.
        let under_a_key = path.iter().any(
            |segment| matches!(segment, Segment::Map { key } if matches!(key.as_str(), "apiKey" | "apiKeys" | "value")),
        );
        let problem = if under_a_key {
            "must be an object with exactly one of `value`, `env` or `secretKeyRef`".to_string()
        } else {
            without_path_prefix(&error.inner().to_string(), &path.to_string())
        };
        DocumentError::Field { path: path.to_string(), problem }
    })
}

/// serde_yaml starts some messages with (part of) the path it tracked itself; the path is
/// reported separately, so drop it.
fn without_path_prefix(message: &str, path: &str) -> String {
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => rest.to_string(),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_errors;

    #[test]
    fn schema_errors_name_the_field_path() {
        let base = "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: x}\nspec:\n  providers: [{name: m, type: mock}]\n  routes: [{model: chat, chain: [{provider: m, model: x}]}]\n";
        assert!(parse_policy(base).is_ok());
        let cases = [
            (base.replace("model: x}", "modle: x}"), "`spec.routes[0].chain[0].modle`: unknown field `modle`"),
            (base.replace("type: mock", "type: openia"), "`spec.providers[0].type`: unknown variant `openia`"),
            (
                base.replace("[{name: m, type: mock}]", "[{name: m, type: mock, mock: {chunks: many}}]"),
                "`spec.providers[0].mock.chunks`: invalid type",
            ),
            (base.replace("backstop.dev/v1alpha1", "v1"), "`apiVersion`: must be `backstop.dev/v1alpha1`"),
            (base.replace("kind: FallbackPolicy", "kind: ConfigMap"), "`kind`: must be `FallbackPolicy`"),
            (
                base.replace("  routes:", "  fallbakOn: [timeout]\n  routes:"),
                "`spec.fallbakOn`: unknown field `fallbakOn`",
            ),
            (
                base.replace("  routes: [{model: chat, chain: [{provider: m, model: x}]}]\n", ""),
                "`spec`: missing field `routes`",
            ),
            ("just text".to_string(), "not a FallbackPolicy document"),
            (
                base.replace("type: mock}]", "type: openai, apiKey: sk-live-leaky}]"),
                "`spec.providers[0].apiKey`: must be an object",
            ),
        ];
        assert_errors(&cases, parse_policy);
    }
}
