{{/* The release's base name, at most 52 characters so that suffixes fit in 63. */}}
{{- define "backstop.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "backstop.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "backstop.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "backstop.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Secret holding the operator's certificate, key and CA: the user's own, or the chart's. */}}
{{- define "backstop.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "backstop.fullname" .)) -}}
{{- end -}}

{{- define "backstop.configService" -}}
{{- printf "%s-config" (include "backstop.fullname" .) -}}
{{- end -}}

{{- define "backstop.webhookService" -}}
{{- printf "%s-webhook" (include "backstop.fullname" .) -}}
{{- end -}}

{{/* Every DNS name the operator's certificate must carry. */}}
{{- define "backstop.dnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list -}}
{{- range $service := list (include "backstop.configService" .) (include "backstop.webhookService" .) -}}
{{- $names = concat $names (list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns)) -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* The standard OTEL_* variables from `openTelemetry`, for the operator and the sidecars. */}}
{{- define "backstop.otelEnv" -}}
{{- with .Values.openTelemetry -}}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- with .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- with .resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ . | quote }}
{{- end }}
{{- range .env }}
- name: {{ .name }}
  value: {{ .value | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The MutatingWebhookConfiguration; `ca` is the base64 CA bundle (empty with cert-manager). */}}
{{- define "backstop.webhookConfiguration" -}}
{{- $ca := .ca }}
{{- with .root }}
{{- $service := dict "name" (include "backstop.webhookService" .) "namespace" .Release.Namespace "path" "/inject" "port" 443 }}
# Injects the sidecar into pods of namespaces labelled `backstop.dev/inject=enabled`, and into
# pods labelled so anywhere else. Pods opt out with the annotation `backstop.dev/inject: disabled`.
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: {{ include "backstop.fullname" . }}
  labels:
    {{- include "backstop.labels" . | nindent 4 }}
  {{- if .Values.tls.certManager.enabled }}
  annotations:
    cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "backstop.fullname" .) }}
  {{- end }}
webhooks:
  - name: namespace.inject.backstop.dev
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: {{ .Values.webhook.failurePolicy }}
    timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
    reinvocationPolicy: Never
    matchPolicy: Equivalent
    clientConfig:
      service: {{ toJson $service }}
      {{- with $ca }}
      caBundle: {{ . }}
      {{- end }}
    rules:
      - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods], scope: Namespaced}
    namespaceSelector:
      matchLabels: {backstop.dev/inject: enabled}
  - name: pod.inject.backstop.dev
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: {{ .Values.webhook.failurePolicy }}
    timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
    reinvocationPolicy: Never
    matchPolicy: Equivalent
    clientConfig:
      service: {{ toJson $service }}
      {{- with $ca }}
      caBundle: {{ . }}
      {{- end }}
    rules:
      - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods], scope: Namespaced}
    # Labelled namespaces are the first webhook's; pods labelled elsewhere are this one's.
    namespaceSelector:
      matchExpressions:
        - {key: backstop.dev/inject, operator: NotIn, values: [enabled]}
    objectSelector:
      matchLabels: {backstop.dev/inject: enabled}
{{- end }}
{{- end -}}
