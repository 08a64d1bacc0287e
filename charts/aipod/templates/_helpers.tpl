{{- define "aipod.name" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aipod.labels" -}}
app.kubernetes.io/name: aipod-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "aipod.selector" -}}
app.kubernetes.io/name: aipod-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aipod.repository" -}}
{{- $repo := index . 0 -}}{{- $registry := index . 1 -}}
{{- if or (contains "/" $repo) (not $registry) -}}
{{ $repo }}
{{- else -}}
{{ $registry | trimSuffix "/" }}/{{ $repo }}
{{- end -}}
{{- end -}}

{{- define "aipod.image" -}}
{{- $repo := include "aipod.repository" (list .Values.image.repository .Values.registry) -}}
{{- if .Values.image.digest -}}
{{ $repo }}@{{ .Values.image.digest }}
{{- else -}}
{{ $repo }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "aipod.runtimeImage" -}}
{{ include "aipod.repository" (list .Values.runtimeImage.repository .Values.registry) }}:{{ .Values.runtimeImage.tag | default .Chart.AppVersion }}
{{- end -}}
