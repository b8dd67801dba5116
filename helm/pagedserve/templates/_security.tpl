{{/* Security wiring shared by every container (README: Security): TLS files from a
Secret, the internal token from a Secret (as $PAGEDSERVE_INTERNAL_TOKEN, never an
argument), the API key file for the tokenizer, and probes that speak TLS when the ports
do (kubelet's gRPC probes cannot). */}}
{{- define "pagedserve.tlsDir" -}}/etc/pagedserve/tls{{- end -}}
{{- define "pagedserve.apiKeysDir" -}}/etc/pagedserve/api-keys{{- end -}}

{{/* TLS flags of any service; pass the root context. */}}
{{- define "pagedserve.tlsArgs" -}}
{{- $tls := .Values.security.tls -}}
{{- if $tls.secretName -}}
- --ssl-certfile={{ include "pagedserve.tlsDir" . }}/tls.crt
- --ssl-keyfile={{ include "pagedserve.tlsDir" . }}/tls.key
{{- if $tls.mutualTls }}
- --ssl-ca-certs={{ include "pagedserve.tlsDir" . }}/ca.crt
{{- end }}
{{- end -}}
{{- end -}}

{{/* The tokenizer's own: its API keys, and the name in the schedulers' certificate (it
dials their pod addresses, which no certificate holds). */}}
{{- define "pagedserve.tokenizerSecurityArgs" -}}
{{- if .Values.security.tls.secretName }}
- --ssl-server-name={{ include "pagedserve.fullname" . }}-scheduler-headless
{{- end }}
{{- if .Values.security.apiKeys.secretName }}
- --api-key-file={{ include "pagedserve.apiKeysDir" . }}/{{ .Values.security.apiKeys.key }}
{{- end }}
{{- end -}}

{{- define "pagedserve.securityEnv" -}}
{{- with .Values.security.internalToken -}}
{{- if .secretName -}}
- name: PAGEDSERVE_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .secretName }}, key: {{ .key }}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pagedserve.securityVolumes" -}}
{{- if .Values.security.tls.secretName }}
- name: tls
  secret: {secretName: {{ .Values.security.tls.secretName }}}
{{- end }}
{{- if .Values.security.apiKeys.secretName }}
- name: api-keys
  secret: {secretName: {{ .Values.security.apiKeys.secretName }}}
{{- end }}
{{- end -}}

{{/* Pass (dict "root" $ "apiKeys" true|false). */}}
{{- define "pagedserve.securityMounts" -}}
{{- if .root.Values.security.tls.secretName }}
- name: tls
  mountPath: {{ include "pagedserve.tlsDir" .root }}
  readOnly: true
{{- end }}
{{- if and .apiKeys .root.Values.security.apiKeys.secretName }}
- name: api-keys
  mountPath: {{ include "pagedserve.apiKeysDir" .root }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* One probe's check: kubelet's gRPC probe on a plaintext port; over TLS the image's
health check, presenting the pod's certificate. Pass (dict "root" $ "port" N "service" S). */}}
{{- define "pagedserve.probeCheck" -}}
{{- $tls := .root.Values.security.tls -}}
{{- if $tls.secretName -}}
exec:
  command:
    - python
    - /opt/pagedserve/healthcheck.py
    - localhost:{{ .port }}
    - {{ .service | quote }}
    - {{ include "pagedserve.tlsDir" .root }}
{{- else -}}
grpc: {port: {{ .port }}{{ if .service }}, service: {{ .service }}{{ end }}}
{{- end -}}
{{- end -}}
