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

{{/* ------------------------------------------------------------ in-server layout */}}

{{/* Whether the standalone workers are deployed: always on their own; next to the
in-server worker only when a workspace for them is given. */}}
{{- define "hypha-conda-worker.standaloneEnabled" -}}
{{- if and (gt (int .Values.replicaCount) 0) (or (not .Values.condaWorker.enabled) .Values.hypha.workspace) -}}
true
{{- end -}}
{{- end -}}

{{- define "hypha-conda-worker.serverName" -}}
{{- printf "%s-server" (include "hypha-conda-worker.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The server pods carry their own name label, so the workers' selector (name and
instance) never matches them. */}}
{{- define "hypha-conda-worker.serverSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-server" (include "hypha-conda-worker.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "hypha-conda-worker.serverLabels" -}}
helm.sh/chart: {{ include "hypha-conda-worker.chart" . }}
{{ include "hypha-conda-worker.serverSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Where the standalone workers connect: hypha.serverUrl, else this chart's server. */}}
{{- define "hypha-conda-worker.serverUrl" -}}
{{- if .Values.hypha.serverUrl -}}
{{- .Values.hypha.serverUrl -}}
{{- else if .Values.condaWorker.enabled -}}
{{- printf "http://%s:%v" (include "hypha-conda-worker.serverName" .) .Values.server.port -}}
{{- end -}}
{{- end -}}

{{- define "hypha-conda-worker.serverCacheClaimName" -}}
{{- printf "%s-cache" (include "hypha-conda-worker.serverName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* CONDA_AUTHORIZED_WORKSPACES from a comma-separated string or a list. */}}
{{- define "hypha-conda-worker.serverAuthorizedWorkspaces" -}}
{{- $value := .Values.condaWorker.authorizedWorkspaces -}}
{{- if kindIs "slice" $value -}}
{{- join "," $value -}}
{{- else -}}
{{- $value | toString -}}
{{- end -}}
{{- end -}}
