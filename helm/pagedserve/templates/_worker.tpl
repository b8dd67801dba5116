{{/* The ranks of one engine: tensorParallelSize x pipelineParallelSize worker containers in
the engine pod. Rank r is the container "worker" (r = 0) or "workerR", with the gRPC port
engine.worker.port + r and the metrics port metrics.ports.worker + r, as `pagedserve serve`
lays out its ranks on one machine. */}}
{{- define "pagedserve.worldSize" -}}
{{- $w := .Values.engine.worker -}}
{{- $size := mul $w.tensorParallelSize $w.pipelineParallelSize -}}
{{- if gt (int $size) 8 -}}
{{- fail (printf "engine.worker: tensorParallelSize x pipelineParallelSize is %d ranks; one engine pod holds at most 8 (one node's GPUs): spread a larger engine over several pods (README: Beyond one node)" (int $size)) -}}
{{- end -}}
{{- $size -}}
{{- end -}}

{{/* The ranks, 0 to worldSize - 1, as a list for `range`. */}}
{{- define "pagedserve.ranks" -}}
{{- toJson (untilStep 0 (int (include "pagedserve.worldSize" .)) 1) -}}
{{- end -}}

{{- define "pagedserve.workerName" -}}
{{- if eq (int .) 0 -}}worker{{- else -}}worker{{ . }}{{- end -}}
{{- end -}}

{{/* One rank's worker container: pass (dict "root" $ "rank" R). */}}
{{- define "pagedserve.workerContainer" -}}
{{- $root := .root -}}
{{- $rank := int .rank -}}
{{- $e := $root.Values.engine -}}
{{- $w := $e.worker -}}
{{- $grace := $root.Values.shutdownGraceSeconds -}}
{{- $name := include "pagedserve.workerName" $rank -}}
{{- $port := add $w.port $rank -}}
{{- $world := int (include "pagedserve.worldSize" $root) -}}
- name: {{ $name }}
  image: {{ include "pagedserve.workerImage" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args:
    - worker
    - --port={{ $port }}
    - --device={{ $w.device }}
    - --shutdown-grace={{ $grace }}
    - --metrics-port={{ add $root.Values.metrics.ports.worker $rank }}
    {{- if gt $world 1 }}
    - --tensor-parallel-size={{ $w.tensorParallelSize }}
    - --pipeline-parallel-size={{ $w.pipelineParallelSize }}
    - --rank={{ $rank }}
    - --dist-init-addr=localhost:{{ $w.distInitPort }}
    {{- with $w.distTimeoutSeconds }}
    - --dist-timeout={{ . }}
    {{- end }}
    {{- end }}
    {{- with $w.dtype }}
    - --dtype={{ . }}
    {{- end }}
    {{- with $w.numKvBlocks }}
    - --num-kv-blocks={{ . }}
    {{- end }}
    {{- with $w.maxNumSeqs }}
    - --max-num-seqs={{ . }}
    {{- end }}
    {{- with $w.maxNumBatchedTokens }}
    - --max-num-batched-tokens={{ . }}
    {{- end }}
    {{- with include "pagedserve.modelArgs" $root }}{{ . | nindent 4 }}{{ end }}
    {{- with include "pagedserve.tlsArgs" $root }}{{ . | nindent 4 }}{{ end }}
    {{- with $w.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - {name: {{ include "pagedserve.workerPortName" (dict "kind" "grpc" "rank" $rank) }}, containerPort: {{ $port }}, protocol: TCP}
    - {name: {{ include "pagedserve.workerPortName" (dict "kind" "metrics" "rank" $rank) }}, containerPort: {{ add $root.Values.metrics.ports.worker $rank }}, protocol: TCP}
  envFrom:
    - configMapRef:
        name: {{ include "pagedserve.fullname" $root }}-env
  env:
    - {name: OTEL_SERVICE_NAME, value: pagedserve-worker}
    {{- with include "pagedserve.securityEnv" $root }}{{ . | nindent 4 }}{{ end }}
  {{- include "pagedserve.probes" (dict "root" $root "port" $port "startup" $root.Values.startupProbe) | nindent 2 }}
  {{- include "pagedserve.preStop" (dict "seconds" (add $root.Values.preStopSleepSeconds $grace)) | nindent 2 }}
  resources:
    {{- toYaml $w.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    {{- include "pagedserve.scratchMounts" $root | nindent 4 }}
    {{- with include "pagedserve.modelMount" $root }}{{ . | nindent 4 }}{{ end }}
    {{- with include "pagedserve.securityMounts" (dict "root" $root "apiKeys" false) }}{{ . | nindent 4 }}{{ end }}
    {{- if gt $world 1 }}
    - name: shm
      mountPath: /dev/shm
    {{- end }}
{{- end -}}

{{/* "grpc-worker", "metrics-worker" for rank 0 (the names of a single-rank engine), then
"grpc-worker1", "metrics-worker1", ... (at most 15 characters, so ranks 0 to 9 fit).
Pass (dict "kind" "grpc"|"metrics" "rank" R). */}}
{{- define "pagedserve.workerPortName" -}}
{{ .kind }}-{{ include "pagedserve.workerName" .rank }}
{{- end -}}
