{{/* Chart name, shortened to the 63 characters a label allows. */}}
{{- define "hypha-conda-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of the release's objects. */}}
{{- define "hypha-conda-worker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hypha-conda-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hypha-conda-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hypha-conda-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "hypha-conda-worker.labels" -}}
helm.sh/chart: {{ include "hypha-conda-worker.chart" . }}
{{ include "hypha-conda-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret holding HYPHA_TOKEN: the user's, or the one this chart creates. */}}
{{- define "hypha-conda-worker.tokenSecretName" -}}
{{- if .Values.token.existingSecret -}}
{{- .Values.token.existingSecret -}}
{{- else if .Values.token.value -}}
{{- printf "%s-token" (include "hypha-conda-worker.fullname" .) -}}
{{- else -}}
{{- fail "Set token.existingSecret (a Secret holding the workspace token) or token.value." -}}
{{- end -}}
{{- end -}}

{{- define "hypha-conda-worker.tokenSecretKey" -}}
{{- if .Values.token.existingSecret -}}
{{- .Values.token.existingSecretKey -}}
{{- else -}}
token
{{- end -}}
{{- end -}}

{{/* The claim holding the cache, when persistence is enabled. */}}
{{- define "hypha-conda-worker.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "hypha-conda-worker.fullname" .)) .Values.cache.persistence.existingClaim -}}
{{- end -}}

{{- define "hypha-conda-worker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
