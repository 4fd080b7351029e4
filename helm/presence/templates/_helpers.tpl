{{/*
Expand the name of the chart.
*/}}
{{- define "presence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (the DNS label limit).
If the release name already contains the chart name it is used as is. The
trial Redis appends "-redis" and the headless Service "-headless", so those
names are truncated further to stay valid.
*/}}
{{- define "presence.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "presence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "presence.labels" -}}
helm.sh/chart: {{ include "presence.chart" . }}
{{ include "presence.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: presence
{{- end }}

{{/*
Selector labels of the presence pods. The component label keeps them apart
from the trial Redis pods of the same release.
*/}}
{{- define "presence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "presence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Trial Redis: name, labels, selector labels.
*/}}
{{- define "presence.redis.fullname" -}}
{{- printf "%s-redis" (include "presence.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "presence.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "presence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: trial-redis
{{- end }}

{{- define "presence.redis.labels" -}}
helm.sh/chart: {{ include "presence.chart" . }}
{{ include "presence.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.trialRedis.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: presence
{{- end }}

{{/*
Name of the service account to use.
*/}}
{{- define "presence.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "presence.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The presence image: repository@digest when a digest is given, else
repository:tag (tag defaulting to the chart's appVersion).
*/}}
{{- define "presence.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Where the Redis URL lives: the Secret's name and key. Empty for inMemory.
The chart's own Secret holds either redis.url or the trial Redis' URL;
redis.existingSecret points at one the operator manages.
*/}}
{{- define "presence.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else if or .Values.redis.url .Values.trialRedis.enabled }}
{{- include "presence.fullname" . }}
{{- end }}
{{- end }}

{{- define "presence.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecretKey }}
{{- else }}
{{- "redis-url" }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the chart itself creates the Redis URL Secret.
*/}}
{{- define "presence.createRedisSecret" -}}
{{- if and (not .Values.redis.existingSecret) (or .Values.redis.url .Values.trialRedis.enabled) }}true{{ end }}
{{- end }}

{{/*
The trial Redis' URL, inside the release's namespace.
*/}}
{{- define "presence.trialRedisUrl" -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "presence.redis.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The smallest number of presence pods that will run: the PDB is only useful,
and only safe for node drains, when this is above one.
*/}}
{{- define "presence.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: it must cover the preStop sleep plus the
drain, or the kubelet's SIGKILL cuts the drain short. Derived by default,
checked when overridden.
*/}}
{{- define "presence.preStopSleepSeconds" -}}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}
{{- .Values.preStopSleepSeconds | int }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{- define "presence.terminationGracePeriodSeconds" -}}
{{- $needed := add (include "presence.preStopSleepSeconds" . | int) (.Values.config.shutdownGraceSeconds | int) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 5 }}
{{- else if le (.Values.terminationGracePeriodSeconds | int) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than preStopSleepSeconds + config.shutdownGraceSeconds (%d), or the drain is cut short by SIGKILL" (.Values.terminationGracePeriodSeconds | int) $needed) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/*
A duration in the schema's humantime subset ("5m", "1h30m", "500ms"), in
whole microseconds, so its range can be checked at render time against the
limits the service itself enforces at start-up.
*/}}
{{- define "presence.durationMicros" -}}
{{- $total := 0 }}
{{- $factors := dict "ns" 0 "us" 1 "ms" 1000 "s" 1000000 "m" 60000000 "h" 3600000000 "d" 86400000000 }}
{{- range regexFindAll "[0-9]+(ns|us|ms|s|m|h|d)" . -1 }}
{{- $n := regexFind "^[0-9]+" . | int64 }}
{{- $unit := regexFind "[a-z]+$" . }}
{{- if eq $unit "ns" }}
{{- $total = add $total (div $n 1000) }}
{{- else }}
{{- $total = add $total (mul $n (get $factors $unit)) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express. Included by
the Deployment, so every render runs it.
*/}}
{{- define "presence.validate" -}}
{{- $stores := list }}
{{- if .Values.redis.url }}{{ $stores = append $stores "redis.url" }}{{ end }}
{{- if .Values.redis.existingSecret }}{{ $stores = append $stores "redis.existingSecret" }}{{ end }}
{{- if .Values.trialRedis.enabled }}{{ $stores = append $stores "trialRedis.enabled" }}{{ end }}
{{- if .Values.inMemory.enabled }}{{ $stores = append $stores "inMemory.enabled" }}{{ end }}
{{- if eq (len $stores) 0 }}
{{- fail "presence needs a store: set redis.url or redis.existingSecret (production), or trialRedis.enabled=true (a throwaway Redis in the release). For a single pod without Redis set inMemory.enabled=true and replicaCount=1." }}
{{- end }}
{{- if gt (len $stores) 1 }}
{{- fail (printf "presence takes exactly one store, but several are set: %s. Keep one; trialRedis.enabled is true by default, so set trialRedis.enabled=false when you use redis.url, redis.existingSecret or inMemory.enabled." (join ", " $stores)) }}
{{- end }}
{{- if .Values.inMemory.enabled }}
{{- if .Values.autoscaling.enabled }}
{{- fail "inMemory.enabled keeps state inside each pod, so it cannot autoscale: set autoscaling.enabled=false, or use Redis." }}
{{- end }}
{{- if ne (.Values.replicaCount | int) 1 }}
{{- fail (printf "inMemory.enabled keeps state inside each pod, so each of %d replicas would answer differently: set replicaCount=1, or use Redis." (.Values.replicaCount | int)) }}
{{- end }}
{{- end }}
{{- $tick := include "presence.durationMicros" .Values.config.tickInterval | int64 }}
{{- if or (lt $tick 100000) (gt $tick 86400000000) }}
{{- fail (printf "config.tickInterval %q is out of range: the service accepts 100ms to 24h" .Values.config.tickInterval) }}
{{- end }}
{{- $timeout := include "presence.durationMicros" .Values.config.redisTimeout | int64 }}
{{- if or (lt $timeout 1000) (gt $timeout 60000000) }}
{{- fail (printf "config.redisTimeout %q is out of range: the service accepts 1ms to 60s" .Values.config.redisTimeout) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (.Values.autoscaling.minReplicas | int) (.Values.autoscaling.maxReplicas | int)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (.Values.autoscaling.minReplicas | int) (.Values.autoscaling.maxReplicas | int)) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.egress.enabled (or .Values.redis.url .Values.redis.existingSecret) (not .Values.networkPolicy.egress.redisTo) }}
{{- fail "networkPolicy.egress.enabled with an external Redis needs networkPolicy.egress.redisTo (e.g. an ipBlock for the Redis address), or every Redis call is blocked." }}
{{- end }}
{{- include "presence.validateSecurity" . }}
{{- end }}

{{/*
Securing the deployment. The TLS Secret: the one given, else the
cert-manager Certificate's.
*/}}
{{- define "presence.tlsSecretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "presence.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/*
The port the probes call: the plaintext health port when the gRPC port
speaks TLS (Kubernetes' gRPC probe cannot), else the gRPC port.
*/}}
{{- define "presence.probePort" -}}
{{- if .Values.tls.enabled }}
{{- .Values.containerPorts.health }}
{{- else }}
{{- .Values.containerPorts.grpc }}
{{- end }}
{{- end }}

{{/*
Where the Secrets are mounted: each as a directory (never subPath, which
would freeze the file), so that the kubelet's updates reach the process.
*/}}
{{- define "presence.secretsDir" -}}/etc/presence{{- end }}

{{/*
Peers of the gRPC and metrics ports, as NetworkPolicyPeer list items.
Empty: the port is closed to pods.
*/}}
{{- define "presence.grpcPeers" -}}
{{- if .Values.networkPolicy.grpcFromSameNamespace }}
- podSelector: {}
{{- end }}
{{- range .Values.networkPolicy.grpcFromNamespaces }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . | quote }}
{{- end }}
{{- with .Values.networkPolicy.grpcFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "presence.metricsPeers" -}}
{{- range .Values.networkPolicy.metricsFromNamespaces }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . | quote }}
{{- end }}
{{- with .Values.networkPolicy.metricsFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Checks of the security values, across keys. Included by presence.validate.
*/}}
{{- define "presence.validateSecurity" -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not .Values.tls.certManager.enabled) }}
{{- fail "tls.enabled needs a certificate: set tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled=true with tls.certManager.issuerRef.name." }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.enabled) }}
{{- fail "tls.certManager.enabled makes a certificate for the gRPC port: set tls.enabled=true too." }}
{{- end }}
{{- if and .Values.tls.certManager.enabled .Values.tls.existingSecret }}
{{- fail "tls.existingSecret and tls.certManager.enabled are two sources of the certificate: keep one." }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (an Issuer or ClusterIssuer of cert-manager)." }}
{{- end }}
{{- if and .Values.tls.clientCa.existingSecret (not .Values.tls.enabled) }}
{{- fail "tls.clientCa.existingSecret (mutual TLS) needs tls.enabled=true." }}
{{- end }}
{{- if and (eq .Values.guests.addresses "hashed") (not .Values.guests.hashKeySecret) }}
{{- fail "guests.addresses=hashed needs guests.hashKeySecret: a Secret with a key of at least 32 bytes (e.g. from `openssl rand -hex 32`), the same for every pod." }}
{{- end }}
{{- if and .Values.guests.hashKeySecret (ne .Values.guests.addresses "hashed") }}
{{- fail "guests.hashKeySecret is used only with guests.addresses=hashed." }}
{{- end }}
{{- if .Values.redis.caSecret }}
{{- if or .Values.trialRedis.enabled .Values.inMemory.enabled }}
{{- fail "redis.caSecret is for your own Redis over TLS (rediss://): the trial Redis and the in-memory store have no TLS." }}
{{- end }}
{{- if and .Values.redis.url (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.caSecret needs a rediss:// redis.url (Redis over TLS)." }}
{{- end }}
{{- end }}
{{- end }}

{{/*
PromQL label matchers that pick this release's series: by default the job
and namespace labels the chart's ServiceMonitor gives them (job is the
Service's name).
*/}}
{{- define "presence.seriesSelector" -}}
{{- .Values.prometheusRule.seriesSelector | default (printf "job=%q,namespace=%q" (include "presence.fullname" .) .Release.Namespace) }}
{{- end }}

{{/*
An alert's labels: its severity, then prometheusRule.alertLabels (which win).
Called with (list $ "severity" extraLabels).
*/}}
{{- define "presence.alertLabels" -}}
{{- $root := index . 0 }}
{{- $own := merge (dict "severity" (index . 1)) (index . 2) }}
{{- toYaml (merge (dict) $root.Values.prometheusRule.alertLabels $own) }}
{{- end }}
