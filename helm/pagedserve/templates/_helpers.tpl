{{- define "pagedserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "root" $ "component" "tokenizer"). */}}
{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pagedserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "pagedserve.workerImage" -}}
{{- $image := .Values.engine.worker.image -}}
{{- printf "%s:%s" ($image.repository | default .Values.image.repository) ($image.tag | default .Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Model flag, volume and mount; each empty for the embedded model, which the image
resolves by itself. Call sites render them with `with`, so that empty leaves no line. */}}
{{- define "pagedserve.modelArgs" -}}
{{- if eq .Values.model.source "volume" -}}
- --model={{ trimSuffix "/" .Values.model.mountPath }}/{{ trimPrefix "/" .Values.model.path }}
{{- end -}}
{{- end -}}

{{- define "pagedserve.modelVolume" -}}
{{- if eq .Values.model.source "volume" -}}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "pagedserve.modelMount" -}}
{{- if eq .Values.model.source "volume" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The root filesystem is read-only; these are the places a process may write. */}}
{{- define "pagedserve.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{- define "pagedserve.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/pagedserve
{{- end -}}

{{/* Kubelet gRPC probes ask the standard health service. Readiness asks for the whole
server (""), which reports NOT_SERVING until the model or the peers are ready, again
whenever a peer it needs is down (a scheduler whose workers failed, a tokenizer with no
serving engine) and while draining: it follows the chain, and only takes the pod out of
its Services. Startup and liveness ask for "liveness", SERVING whenever the process's
event loop answers, so that a frontend waiting for its scheduler, or a scheduler waiting
for a restarted worker, is never restarted for it; a stopped or hung process is, after
livenessProbe's failureThreshold x periodSeconds. Startup allows a slow start of the
process itself (imports, device initialization) before liveness counts.
Over TLS the probes run the image's health check instead (pagedserve.probeCheck).
Pass (dict "root" $ "port" N "startup" .Values.startupProbe). */}}
{{- define "pagedserve.probes" -}}
startupProbe:
  {{- include "pagedserve.probeCheck" (dict "root" .root "port" .port "service" "liveness") | nindent 2 }}
  periodSeconds: {{ .startup.periodSeconds }}
  failureThreshold: {{ .startup.failureThreshold }}
  timeoutSeconds: 5
readinessProbe:
  {{- include "pagedserve.probeCheck" (dict "root" .root "port" .port "service" "") | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 2
  timeoutSeconds: 5
livenessProbe:
  {{- include "pagedserve.probeCheck" (dict "root" .root "port" .port "service" "liveness") | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 4
  timeoutSeconds: 5
{{- end -}}

{{- define "pagedserve.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ .seconds }}"]
{{- end -}}

{{- define "pagedserve.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}
