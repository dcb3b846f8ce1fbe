//! The `FallbackPolicy` CustomResourceDefinition, generated from the types: what `backstop
//! crd` prints and `crds/` holds. Tests keep it structural, documented and in step with the
//! checked-in copy.

use serde_json::Value;

use super::FallbackPolicy;

/// The CRD generated from these types, with the integer formats Rust's unsigned types give
/// (`uint32`, ...) named as Kubernetes knows them (`int32`, `int64`), so that neither the API
/// server nor `kubectl` warns about an unrecognized format. The ranges stay in
/// `minimum`/`maximum`.
pub fn crd() -> Value {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(FallbackPolicy::crd()).unwrap_or_default();
    kubernetes_formats(&mut crd);
    crd
}

fn kubernetes_formats(node: &mut Value) {
    match node {
        Value::Object(object) => {
            if let Some(Value::String(format)) = object.get_mut("format") {
                match format.as_str() {
                    "uint8" | "uint16" | "int8" | "int16" => *format = "int32".into(),
                    "uint32" | "uint64" | "uint" => *format = "int64".into(),
                    _ => {}
                }
            }
            object.values_mut().for_each(kubernetes_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}

/// The CRD manifest, as YAML.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::GROUP;
    use kube::CustomResourceExt;
    use serde_json::Value;

    /// Collects every way `schema` breaks Kubernetes' structural-schema rules.
    fn structural_violations(schema: &Value, path: &str, in_logic: bool, out: &mut Vec<String>) {
        let Some(obj) = schema.as_object() else {
            out.push(format!("{path}: schema node is not an object"));
            return;
        };
        for key in ["$ref", "$defs", "definitions", "$schema"] {
            if obj.contains_key(key) {
                out.push(format!("{path}: has `{key}`"));
            }
        }
        let extension =
            obj.contains_key("x-kubernetes-int-or-string") || obj.contains_key("x-kubernetes-preserve-unknown-fields");
        if in_logic {
            for key in ["type", "description", "default", "additionalProperties", "nullable"] {
                if obj.contains_key(key) {
                    out.push(format!("{path}: `{key}` inside anyOf/oneOf/allOf/not"));
                }
            }
        } else if !obj.contains_key("type") && !extension {
            out.push(format!("{path}: no `type`"));
        }
        if let Some(Value::String(t)) = obj.get("type")
            && t == "array"
            && !obj.contains_key("items")
        {
            out.push(format!("{path}: array without `items`"));
        }
        if let Some(types) = obj.get("type")
            && !types.is_string()
        {
            out.push(format!("{path}: `type` must be one string, got {types}"));
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                structural_violations(sub, &format!("{path}.{name}"), in_logic, out);
            }
        }
        if let Some(items) = obj.get("items") {
            structural_violations(items, &format!("{path}[]"), in_logic, out);
        }
        if let Some(extra) = obj.get("additionalProperties")
            && extra.is_object()
        {
            structural_violations(extra, &format!("{path}{{}}"), in_logic, out);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(list) = obj.get(key).and_then(Value::as_array) {
                for (i, sub) in list.iter().enumerate() {
                    structural_violations(sub, &format!("{path}.{key}[{i}]"), true, out);
                }
            }
        }
    }

    #[test]
    fn every_format_is_one_kubernetes_recognizes() {
        fn formats(node: &Value, out: &mut Vec<String>) {
            match node {
                Value::Object(object) => {
                    if let Some(Value::String(format)) = object.get("format") {
                        out.push(format.clone());
                    }
                    object.values().for_each(|v| formats(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| formats(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        formats(&super::crd(), &mut found);
        let known = ["int32", "int64", "float", "double", "byte", "date", "date-time", "duration", "uri"];
        let unknown: Vec<&String> = found.iter().filter(|f| !known.contains(&f.as_str())).collect();
        assert!(unknown.is_empty(), "formats Kubernetes warns about: {unknown:?}");
        assert!(found.iter().any(|f| f == "int64"));
    }

    #[test]
    fn generated_schema_is_structural() {
        let crd = serde_json::to_value(FallbackPolicy::crd()).expect("crd serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(schema.is_object(), "CRD has no openAPIV3Schema");
        let mut violations = Vec::new();
        structural_violations(schema, "openAPIV3Schema", false, &mut violations);
        assert!(violations.is_empty(), "not a structural schema:\n{}", violations.join("\n"));
        // The checker itself must be able to fail.
        let mut bad = Vec::new();
        structural_violations(
            &serde_json::json!({"type":"object","properties":{"a":{"$ref":"#/x"},"b":{"anyOf":[{"type":"string"}]}}}),
            "t",
            false,
            &mut bad,
        );
        assert_eq!(bad.len(), 4, "{bad:?}");
    }

    #[test]
    fn checked_in_crd_matches_the_code() {
        let generated = crd_yaml().expect("crd renders");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/fallbackpolicy.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "crds/fallbackpolicy.yaml is stale: run `cargo run -- crd > crds/fallbackpolicy.yaml`"
        );
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = FallbackPolicy::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names, Some(vec!["fbp".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["Ready", "Reason", "Routes", "Sidecars", "Degraded", "Verified", "Version", "Age"]);
    }

    #[test]
    fn every_field_is_documented() {
        fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    let here = format!("{path}.{name}");
                    if sub.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                        out.push(here.clone());
                    }
                    undocumented(sub, &here, out);
                }
            }
            if let Some(items) = schema.get("items") {
                undocumented(items, path, out);
            }
        }
        let crd = serde_json::to_value(FallbackPolicy::crd()).expect("crd serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut missing = Vec::new();
        undocumented(spec, "spec", &mut missing);
        // `selector` comes from Kubernetes' own LabelSelector, whose inner docs are upstream's.
        missing.retain(|p| !p.starts_with("spec.selector."));
        assert!(missing.is_empty(), "fields without a description: {missing:?}");
    }
}
