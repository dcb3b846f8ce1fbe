//! Sidecar injection: what the operator's mutating webhook ([`webhook`]) does to a pod, as a
//! pure function of the pod and the injection settings, so that every decision is tested on
//! real AdmissionReview JSON without a cluster.
//!
//! The sidecar goes in as a native sidecar (an init container with `restartPolicy: Always`,
//! first in line, with a startup probe on `/readyz`: the app's containers start once it serves,
//! and it outlives them at shutdown), or as the first regular container on clusters older than
//! 1.29. It gets the pod's projected ServiceAccount token for audience `backstop`, an in-memory
//! `emptyDir` for the last good configuration, probes, resources and a restricted security
//! context. The app's containers get `OPENAI_BASE_URL` and `ANTHROPIC_BASE_URL` pointing at it,
//! and the base URLs the app had go to the sidecar as where to pass calls through while no
//! policy applies: the app changes nothing, and without a policy its calls go where they went.
//!
//! A pod is left alone when it opts out (`backstop.dev/inject: disabled`), when it already has
//! the sidecar, or when it uses the host's network (the sidecar's loopback port would be the
//! node's).

pub mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// The annotation (or label) that opts a pod in (`enabled`) or out (`disabled`).
pub const INJECT: &str = "backstop.dev/inject";
/// The annotation an injected pod carries: the injecting release.
pub const INJECTED: &str = "backstop.dev/injected";
/// Annotations that override the sidecar's image and resources for one pod.
pub const IMAGE_ANNOTATION: &str = "backstop.dev/sidecar-image";
const RESOURCE_ANNOTATIONS: [(&str, &str, &str); 4] = [
    ("backstop.dev/sidecar-cpu-request", "requests", "cpu"),
    ("backstop.dev/sidecar-memory-request", "requests", "memory"),
    ("backstop.dev/sidecar-cpu-limit", "limits", "cpu"),
    ("backstop.dev/sidecar-memory-limit", "limits", "memory"),
];
/// The sidecar container's name.
pub const CONTAINER: &str = "backstop";
/// Where the sidecar listens for the app, on loopback.
pub const LLM_PORT: u16 = 7400;
/// The sidecar's admin port (probes, `/health`, `/metrics`).
pub const ADMIN_PORT: u16 = 7401;
const TOKEN_VOLUME: &str = "backstop-token";
const STATE_VOLUME: &str = "backstop-state";
const TOKEN_DIR: &str = "/var/run/secrets/backstop";
const STATE_DIR: &str = "/var/lib/backstop";

/// How the sidecar joins the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// A native sidecar: an init container with `restartPolicy: Always` (Kubernetes 1.29+).
    #[default]
    Native,
    /// The first regular container (older clusters: no start or stop ordering).
    Container,
}

/// The injection settings, as the chart writes them into the operator's ConfigMap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// The sidecar's image.
    pub image: String,
    /// Its pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// The config service URL the sidecar streams from (`https://SERVICE.NAMESPACE.svc:7402`).
    pub control_plane: String,
    /// The PEM file with the CA that signed the config service's certificate, passed to the
    /// sidecar inline (`BACKSTOP_CONTROL_PLANE_CA_DATA`), so no object is needed in the app's
    /// namespace.
    pub ca_file: PathBuf,
    /// Native sidecar or regular container.
    #[serde(default)]
    pub mode: Mode,
    /// The sidecar's resources.
    #[serde(default)]
    pub resources: ResourceRequirements,
    /// Extra environment for the sidecar (`OTEL_*` settings, `BACKSTOP_LOG`).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// How long a new pod's sidecar waits for the operator before it is ready anyway and
    /// passes calls through (`10s`); the sidecar's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<String>,
}

/// What injection decided for a pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Left as it is, and why.
    Skip(&'static str),
    /// The pod with the sidecar, and warnings for the user (an override that was ignored).
    Inject(Box<Pod>, Vec<String>),
}

/// Whether `text` is a Kubernetes quantity (`100m`, `64Mi`, `1.5`, `2e3`); negative ones are
/// not, as no resource can be.
fn is_quantity(text: &str) -> bool {
    const SUFFIXES: [&str; 13] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E"];
    let number = SUFFIXES.iter().find_map(|suffix| text.strip_suffix(suffix)).unwrap_or(text);
    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(at) if number.len() == text.len() => (&number[..at], Some(&number[at + 1..])),
        _ => (number, None),
    };
    let digits = mantissa.chars().filter(char::is_ascii_digit).count();
    let dots = mantissa.chars().filter(|c| *c == '.').count();
    let mantissa_ok = digits > 0 && dots <= 1 && mantissa.chars().all(|c| c.is_ascii_digit() || c == '.');
    mantissa_ok
        && exponent.is_none_or(|e| {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
        })
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

/// The sidecar container for a pod with `annotations`.
fn sidecar(
    settings: &Settings,
    ca: &str,
    annotations: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Container {
    let mut resources = settings.resources.clone();
    for (annotation, kind, resource) in RESOURCE_ANNOTATIONS {
        let Some(value) = annotations.get(annotation) else { continue };
        if !is_quantity(value) {
            warnings
                .push(format!("{annotation}: `{value}` is not a quantity such as 100m or 64Mi; the default applies"));
            continue;
        }
        let map = if kind == "requests" { &mut resources.requests } else { &mut resources.limits };
        map.get_or_insert_with(BTreeMap::new).insert(resource.into(), Quantity(value.clone()));
    }
    let mut variables = vec![
        env("BACKSTOP_CONTROL_PLANE", &settings.control_plane),
        env("BACKSTOP_CONTROL_PLANE_CA_DATA", ca),
        env("BACKSTOP_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        env("BACKSTOP_STATE_DIR", STATE_DIR),
        env("BACKSTOP_LISTEN", &format!("127.0.0.1:{LLM_PORT}")),
        env("BACKSTOP_ADMIN", &format!("0.0.0.0:{ADMIN_PORT}")),
        env("BACKSTOP_LOG_FORMAT", "json"),
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_UID", "metadata.uid"),
    ];
    if let Some(timeout) = &settings.startup_timeout {
        match crate::chain::parse_duration(timeout) {
            Ok(_) => variables.push(env("BACKSTOP_STARTUP_TIMEOUT", timeout)),
            Err(error) => warnings.push(format!("startupTimeout `{timeout}`: {error}; the sidecar's default applies")),
        }
    }
    if !settings.env.iter().any(|e| e.name == "OTEL_SERVICE_NAME") {
        variables.push(env("OTEL_SERVICE_NAME", "backstop-sidecar"));
    }
    variables.extend(settings.env.iter().cloned());
    Container {
        name: CONTAINER.into(),
        image: Some(annotations.get(IMAGE_ANNOTATION).unwrap_or(&settings.image).clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(vec!["sidecar".into()]),
        env: Some(variables),
        ports: Some(vec![ContainerPort {
            name: Some("backstop-admin".into()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        restart_policy: (settings.mode == Mode::Native).then(|| "Always".to_string()),
        // Ready once a configuration is applied: the app starts after that.
        startup_probe: Some(probe("/readyz", 1, 120)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount { name: STATE_VOLUME.into(), mount_path: STATE_DIR.into(), ..VolumeMount::default() },
        ]),
        ..Container::default()
    }
}

fn volumes() -> [Volume; 2] {
    [
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some("backstop".into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: STATE_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("16Mi".into())),
            }),
            ..Volume::default()
        },
    ]
}

/// The SDK variables the webhook points at the sidecar, the sidecar's URL for each, and the
/// sidecar's variable that takes the app's own value for pass-through.
const BASE_URLS: [(&str, &str, &str); 2] = [
    ("OPENAI_BASE_URL", "/v1", "BACKSTOP_PASSTHROUGH_OPENAI"),
    ("ANTHROPIC_BASE_URL", "", "BACKSTOP_PASSTHROUGH_ANTHROPIC"),
];

fn sidecar_url(suffix: &str) -> String {
    format!("http://127.0.0.1:{LLM_PORT}{suffix}")
}

/// A container's own setting of `name`: its value or where the value comes from; `None` when it
/// sets none (or already points at the sidecar), so its SDK goes to the provider's endpoint.
fn own_setting(container: &Container, name: &str) -> Option<EnvVar> {
    let variable = container.env.as_ref()?.iter().find(|e| e.name == name)?;
    let at_sidecar = variable.value.as_deref().is_some_and(|value| {
        value.contains(&format!("127.0.0.1:{LLM_PORT}")) || value.contains(&format!("localhost:{LLM_PORT}"))
    });
    (!at_sidecar).then(|| EnvVar { name: String::new(), ..variable.clone() })
}

/// Points the pod's app containers at the sidecar. The first container decides where calls go
/// while no policy applies (the base URL it had, else the provider's endpoint): those variables
/// are returned for the sidecar. A container that set another base URL than the first keeps its
/// own, with a warning: pass-through has one destination per API.
fn point_at_sidecar(spec: &mut k8s_openapi::api::core::v1::PodSpec, warnings: &mut Vec<String>) -> Vec<EnvVar> {
    let first = spec.containers.first().map(|c| c.name.clone()).unwrap_or_default();
    let mut passthrough = Vec::new();
    for (name, suffix, sidecar_variable) in BASE_URLS {
        let decided = spec.containers.first().and_then(|c| own_setting(c, name));
        if let Some(own) = &decided {
            passthrough.push(EnvVar { name: sidecar_variable.into(), ..own.clone() });
        }
        let containers = spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten());
        for container in containers {
            if own_setting(container, name) != decided {
                warnings.push(format!(
                    "container `{}` sets {name} to another URL than container `{first}`: it keeps its own and bypasses Backstop",
                    container.name
                ));
                continue;
            }
            let variables = container.env.get_or_insert_with(Vec::new);
            variables.retain(|e| e.name != name);
            variables.push(env(name, &sidecar_url(suffix)));
        }
    }
    passthrough
}

/// What injection does to `pod`; `ca` is the PEM of the config service's CA, `release` the
/// injecting release (recorded on the pod).
pub fn inject(pod: &Pod, settings: &Settings, ca: &str, release: &str) -> Decision {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(INJECT).is_some_and(|v| v == "disabled") {
        return Decision::Skip("the pod opted out with backstop.dev/inject: disabled");
    }
    let Some(spec) = &pod.spec else { return Decision::Skip("the pod has no spec") };
    let has_sidecar = spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == CONTAINER);
    if has_sidecar || annotations.contains_key(INJECTED) {
        return Decision::Skip("the pod already has the sidecar");
    }
    if spec.host_network == Some(true) {
        return Decision::Skip("the pod uses the host's network, where the sidecar's port would be the node's");
    }
    let mut warnings = Vec::new();
    let mut injected = pod.clone();
    let spec = injected.spec.get_or_insert_with(Default::default);
    let passthrough = point_at_sidecar(spec, &mut warnings);
    let mut container = sidecar(settings, ca, &annotations, &mut warnings);
    container.env.get_or_insert_with(Vec::new).extend(passthrough);
    match settings.mode {
        Mode::Native => spec.init_containers.get_or_insert_with(Vec::new).insert(0, container),
        Mode::Container => spec.containers.insert(0, container),
    }
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes());
    injected.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(INJECTED.into(), release.into());
    Decision::Inject(Box::new(injected), warnings)
}

#[cfg(test)]
mod tests;
