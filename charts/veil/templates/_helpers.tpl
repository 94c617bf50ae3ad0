{{/* The chart name, overridable. */}}
{{- define "veil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, with "-veil" unless it has it. */}}
{{- define "veil.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "veil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object the chart renders. */}}
{{- define "veil.labels" -}}
helm.sh/chart: {{ include "veil.chart" . }}
{{ include "veil.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: veil
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "veil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "veil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "veil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "veil.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
repository@digest. A tag can be moved to other content, so one is refused unless
development.allowImageTags is set (local development only).
*/}}
{{- define "veil.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else if .Values.development.allowImageTags }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- else }}
{{- fail "image.digest is required (sha256:...): Veil runs images by digest only; set development.allowImageTags=true to use a tag in development" }}
{{- end }}
{{- end }}

{{/* An image value that must be pinned by digest unless development.allowImageTags. */}}
{{- define "veil.pinnedImage" -}}
{{- $image := index . 0 }}{{- $root := index . 1 }}{{- $name := index . 2 }}
{{- if and $image (not (regexMatch "@sha256:[0-9a-f]{64}$" $image)) (not $root.Values.development.allowImageTags) }}
{{- fail (printf "%s must be pinned by digest (name@sha256:...), not %q; set development.allowImageTags=true to use a tag in development" $name $image) }}
{{- end }}
{{- $image }}
{{- end }}

{{/*
A CRD from the chart's files, with the chart's labels added and, when crds.keep, the
annotation that makes `helm uninstall` leave it. Call with (list $ "files/crds/x.yaml").
*/}}
{{- define "veil.crd" -}}
{{- $root := index . 0 }}
{{- $crd := $root.Files.Get (index . 1) | fromYaml }}
{{- $meta := $crd.metadata }}
{{- /* part-of stays as the file says: `-l app.kubernetes.io/part-of=veil` finds Veil's CRDs only. */}}
{{- $chartLabels := include "veil.labels" $root | fromYaml }}
{{- $_ := unset $chartLabels "app.kubernetes.io/component" }}
{{- $_ = unset $chartLabels "app.kubernetes.io/part-of" }}
{{- $_ = set $meta "labels" (merge ($meta.labels | default dict) $chartLabels) }}
{{- if $root.Values.crds.keep }}
{{- $_ = set $meta "annotations" (merge (dict "helm.sh/resource-policy" "keep") ($meta.annotations | default dict)) }}
{{- end }}
{{- toYaml $crd }}
{{- end }}
