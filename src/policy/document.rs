//! A `FallbackPolicy` YAML document read into the CRD types. The document is first checked
//! against the CRD's own schema (the one the API server enforces in a cluster), so that every
//! schema problem is reported at once, each at its field path; only a document that passes is
//! deserialized. Compile problems come after, from the compiler.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;

use super::{API_VERSION, FallbackPolicy};

/// One place where a document breaks the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// Where, such as `spec.routes[0].chain[1]`.
    pub path: String,
    /// What is wrong there.
    pub problem: String,
}

impl std::fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.path, self.problem)
    }
}

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
    /// Fields that do not fit the schema, every one of them.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Schema(Vec<SchemaProblem>),
}

impl DocumentError {
    /// Each problem on its own, for a report with one line each.
    pub fn problems(&self) -> Vec<String> {
        match self {
            DocumentError::Schema(problems) => problems.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Parses one `FallbackPolicy` YAML document, naming the field path of every schema problem
/// (for example `` `spec.routes[0].chain[1].modle`: unknown field `modle` ``).
pub fn parse_policy(yaml: &str) -> Result<FallbackPolicy, DocumentError> {
    let document: Value = serde_yaml_ng::from_str(yaml).map_err(|e| DocumentError::NotADocument(e.to_string()))?;
    if !document.is_object() {
        return Err(DocumentError::NotADocument("expected a mapping with `apiVersion`, `kind` and `spec`".into()));
    }
    let text = |field: &str| document.get(field).and_then(Value::as_str).unwrap_or_default().to_string();
    if text("apiVersion") != API_VERSION {
        return Err(DocumentError::ApiVersion(text("apiVersion")));
    }
    if text("kind") != "FallbackPolicy" {
        return Err(DocumentError::Kind(text("kind")));
    }
    let problems = schema_problems(&document);
    if !problems.is_empty() {
        return Err(DocumentError::Schema(problems));
    }
    // The schema passed; anything the types still refuse is reported the same way.
    serde_path_to_error::deserialize(&document).map_err(|error| {
        let path = error.path().to_string();
        let problem = if under_a_key(&path) { KEY_SHAPE.to_string() } else { error.inner().to_string() };
        DocumentError::Schema(vec![SchemaProblem { path, problem }])
    })
}

/// What is said of a malformed key field instead of echoing what stands there.
const KEY_SHAPE: &str = "must be an object with exactly one of `value`, `env` or `secretKeyRef`";

/// Whether `path` lies under a field that holds a key: what stands there is never repeated.
fn under_a_key(path: &str) -> bool {
    path.split(['.', '[']).any(|segment| matches!(segment, "apiKey" | "apiKeys" | "value"))
}

/// The CRD's schema as a validator of documents: unknown fields are refused, as the types'
/// `deny_unknown_fields` refuses them (the API server prunes them instead).
fn validator() -> Option<&'static jsonschema::Validator> {
    static VALIDATOR: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            let crd = super::crd::crd();
            let mut schema = crd.pointer("/spec/versions/0/schema/openAPIV3Schema")?.clone();
            // The root leaves out `apiVersion`, `kind` and `metadata` (the API server adds
            // them): close only what lies below it.
            for field in schema.get_mut("properties").and_then(Value::as_object_mut)?.values_mut() {
                close_objects(field);
            }
            jsonschema::options().should_validate_formats(false).build(&schema).ok()
        })
        .as_ref()
}

fn close_objects(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else { return };
    if object.contains_key("properties")
        && !object.contains_key("additionalProperties")
        && !object.contains_key("x-kubernetes-preserve-unknown-fields")
    {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    for value in object.values_mut() {
        match value {
            Value::Object(_) => close_objects(value),
            Value::Array(items) => items.iter_mut().for_each(close_objects),
            _ => {}
        }
    }
}

/// Every place `document` breaks the CRD's schema, in document order.
fn schema_problems(document: &Value) -> Vec<SchemaProblem> {
    let Some(validator) = validator() else { return Vec::new() };
    let mut problems = Vec::new();
    for error in validator.iter_errors(document) {
        let path = dotted(error.instance_path().as_str());
        let found = error.instance();
        let mut push = |path: String, problem: String| {
            let problem = if under_a_key(&path) { KEY_SHAPE.to_string() } else { problem };
            problems.push(SchemaProblem { path, problem });
        };
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                for field in unexpected {
                    push(join(&path, field), format!("unknown field `{field}`"));
                }
            }
            ValidationErrorKind::Required { property } => {
                push(path, format!("missing field `{}`", property.as_str().unwrap_or_default()));
            }
            ValidationErrorKind::Enum { options } => {
                let expected: Vec<String> = options
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|o| format!("`{o}`"))
                    .collect();
                let value = found.as_str().map_or_else(|| found.to_string(), str::to_string);
                push(path, format!("unknown variant `{value}`, expected one of {}", expected.join(", ")));
            }
            ValidationErrorKind::Type { kind } => {
                let expected = match kind {
                    TypeKind::Single(single) => single.to_string(),
                    TypeKind::Multiple(_) => "another type".into(),
                };
                push(path, format!("invalid type: expected {expected}, found {}", describe(found)));
            }
            _ => push(path, error.to_string()),
        }
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    problems
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a map".into(),
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() { field.to_string() } else { format!("{path}.{field}") }
}

/// A JSON pointer (`/spec/routes/0/chain`) as a field path (`spec.routes[0].chain`).
fn dotted(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    path
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
                base.replace("providers: [{name: m, type: mock}]", "providers: [{name: m, type: mock, weight: 3}]"),
                "`spec.providers[0].weight`: unknown field",
            ),
            (
                base.replace("type: mock}]", "type: openai, apiKey: sk-live-leaky}]"),
                "`spec.providers[0].apiKey`: must be an object",
            ),
        ];
        assert_errors(&cases, parse_policy);
    }

    #[test]
    fn every_schema_problem_is_reported_in_one_pass() {
        let yaml = "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: x}\nspec:\n  providers: [{name: m, type: mokc, mock: {chunks: many}}]\n  routes: [{model: chat, chain: [{provider: m, modle: x}]}]\n  fallbakOn: [timeout]\n  retry: {attempts: 0}\n";
        let error = parse_policy(yaml).expect_err("broken four ways");
        let problems = error.problems();
        for expected in [
            "`spec.fallbakOn`: unknown field `fallbakOn`",
            "`spec.providers[0].type`: unknown variant `mokc`",
            "`spec.providers[0].mock.chunks`: invalid type: expected integer, found string \"many\"",
            "`spec.routes[0].chain[0].modle`: unknown field `modle`",
            "`spec.retry.attempts`",
        ] {
            assert!(problems.iter().any(|p| p.contains(expected)), "{expected:?} in {problems:#?}");
        }
        assert!(problems.len() >= 5, "{problems:#?}");
    }
}
