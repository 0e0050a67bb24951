{{/* Names and labels. */}}
{{- define "raylane.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "raylane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "raylane.serviceAccountName" -}}
{{- if .Values.rbac.create -}}{{ include "raylane.fullname" . }}{{- else -}}default{{- end -}}
{{- end -}}

{{/* Redis: where it is and which Secret holds its password. */}}
{{- define "raylane.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis.%s.svc.cluster.local:6379" (include "raylane.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.address -}}
{{- end -}}
{{- end -}}

{{- define "raylane.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "raylane.fullname" .)) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "raylane.redisPasswordKey" -}}
{{- if .Values.redis.enabled -}}password{{- else -}}{{ .Values.redis.external.passwordKey }}{{- end -}}
{{- end -}}

{{/* Values that the schema cannot relate to each other: fail with what to change. */}}
{{- define "raylane.checkValues" -}}
{{- $svc := .Values.rayService -}}
{{- if and $svc.enabled $svc.grpc.enabled (not $svc.apiKey.existingSecret) (not $svc.grpc.withoutApiKey) -}}
{{- fail "rayService.grpc.enabled: Ray Serve's gRPC proxy listens on every interface of the pod; set rayService.apiKey.existingSecret (a Secret holding the API key), or rayService.grpc.withoutApiKey=true on a trusted network, or turn gRPC off" -}}
{{- end -}}
{{- if and $svc.enabled $svc.gcsFaultTolerance (not .Values.redis.enabled) (not .Values.redis.external.address) -}}
{{- fail "rayService.gcsFaultTolerance needs a Redis: set redis.enabled=true, or redis.external.address (host:port) with redis.external.existingSecret, or rayService.gcsFaultTolerance=false" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.address (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.external.address is set: name the Secret holding its password in redis.external.existingSecret (key: redis.external.passwordKey)" -}}
{{- end -}}
{{- end -}}

{{/* One Ray container: image, env, shared storage (and the job config on the head). */}}
{{- define "raylane.container" -}}
{{- $root := .root -}}
name: {{ .name }}
image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
{{- with .ports }}
ports:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- $env := concat (.env | default list) $root.Values.extraEnv }}
{{- with $env }}
env:
{{- toYaml . | nindent 2 }}
{{- end }}
resources:
{{- toYaml .resources | nindent 2 }}
volumeMounts:
  - name: shared
    mountPath: {{ $root.Values.sharedStorage.mountPath }}
{{- if $root.Values.sharedMemory.enabled }}
  - name: dshm
    mountPath: /dev/shm
{{- end }}
{{- if .jobConfig }}
  - name: job-config
    mountPath: /config
    readOnly: true
{{- end }}
{{- end -}}

{{/* The pod spec around one Ray container. */}}
{{- define "raylane.podSpec" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "raylane.serviceAccountName" $root }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - {{ include "raylane.container" . | indent 4 | trim }}
{{- with .group.nodeSelector }}
nodeSelector:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: shared
{{- if $root.Values.sharedStorage.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $root.Values.sharedStorage.existingClaim }}
{{- else }}
    emptyDir: {}
{{- end }}
{{- if $root.Values.sharedMemory.enabled }}
  - name: dshm
    emptyDir:
      medium: Memory
      {{- with $root.Values.sharedMemory.sizeLimit }}
      sizeLimit: {{ . }}
      {{- end }}
{{- end }}
{{- if .jobConfig }}
  - name: job-config
    configMap:
      name: {{ include "raylane.fullname" $root }}-job
{{- end }}
{{- end -}}

{{/*
A RayCluster spec: the head, the CPU and GPU worker groups.
Arguments: root; jobConfig (mount the job's ConfigMap on the head); serving (Serve ports and the API key);
component (the pods' app.kubernetes.io/component label).
*/}}
{{- define "raylane.clusterSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $env := list -}}
{{- if and .serving $v.rayService.apiKey.existingSecret -}}
{{- $env = append $env (dict "name" "RAYLANE_API_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" $v.rayService.apiKey.existingSecret "key" $v.rayService.apiKey.key))) -}}
{{- end -}}
{{- $ports := list (dict "name" "gcs-server" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001) -}}
{{- if .serving -}}
{{- $ports = append $ports (dict "name" "serve" "containerPort" (int $v.rayService.httpPort)) -}}
{{- if $v.rayService.grpc.enabled -}}
{{- $ports = append $ports (dict "name" "grpc" "containerPort" (int $v.rayService.grpc.port)) -}}
{{- end -}}
{{- end -}}
rayVersion: {{ $v.rayVersion | quote }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    {{- range $key, $value := $v.head.rayStartParams }}
    {{ $key }}: {{ $value | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "raylane.labels" $root | nindent 8 }}
        {{- with .component }}
        app.kubernetes.io/component: {{ . }}
        {{- end }}
    spec:
      {{- include "raylane.podSpec" (dict "root" $root "name" "ray-head" "group" $v.head "resources" $v.head.resources "ports" $ports "env" $env "jobConfig" .jobConfig) | nindent 6 }}
{{- if or $v.cpuWorkers.enabled $v.gpuWorkers.enabled }}
workerGroupSpecs:
{{- if $v.cpuWorkers.enabled }}
  - groupName: cpu
    {{- include "raylane.workerGroup" (dict "root" $root "group" $v.cpuWorkers "resources" $v.cpuWorkers.resources "env" $env "component" .component) | nindent 4 }}
{{- end }}
{{- if $v.gpuWorkers.enabled }}
{{- $gpus := dict "nvidia.com/gpu" (int $v.gpuWorkers.gpusPerPod) }}
{{- $resources := dict "requests" (merge (dict) $gpus ($v.gpuWorkers.resources.requests | default dict)) "limits" (merge (dict) $gpus ($v.gpuWorkers.resources.limits | default dict)) }}
  - groupName: gpu
    {{- include "raylane.workerGroup" (dict "root" $root "group" $v.gpuWorkers "resources" $resources "env" $env "component" .component) | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "raylane.workerGroup" -}}
replicas: {{ .group.replicas }}
minReplicas: {{ .group.minReplicas }}
maxReplicas: {{ .group.maxReplicas }}
rayStartParams:
  {{- range $key, $value := .group.rayStartParams }}
  {{ $key }}: {{ $value | toString | quote }}
  {{- end }}
  {{- if not .group.rayStartParams }} {}{{ end }}
template:
  metadata:
    labels:
      {{- include "raylane.labels" .root | nindent 6 }}
      {{- with .component }}
      app.kubernetes.io/component: {{ . }}
      {{- end }}
  spec:
    {{- include "raylane.podSpec" (dict "root" .root "name" "ray-worker" "group" .group "resources" .resources "env" .env) | nindent 4 }}
{{- end -}}
