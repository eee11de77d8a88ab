{{/*
Names, labels and the pieces every workload shares. A "component" below is one of: edge, gateway, validate,
persist (the worker jobs). Helpers that need the component take a dict: (dict "root" $ "component" "edge").
*/}}

{{- define "orders-edge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orders-edge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects: <fullname>-<component> (the worker jobs: <fullname>-worker-<job>). */}}
{{- define "orders-edge.componentName" -}}
{{- $root := .root -}}
{{- if has .component (list "validate" "persist") -}}
{{- printf "%s-worker-%s" (include "orders-edge.fullname" $root) .component | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" (include "orders-edge.fullname" $root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "orders-edge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "orders-edge.labels" -}}
helm.sh/chart: {{ include "orders-edge.chart" . }}
app.kubernetes.io/name: {{ include "orders-edge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orders-edge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of a component (stable across upgrades: never add to these). */}}
{{- define "orders-edge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orders-edge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "orders-edge.componentLabels" -}}
{{ include "orders-edge.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "orders-edge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "orders-edge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The values of a component: .Values.edge, .Values.gateway or .Values.workers.jobs.<job>. */}}
{{- define "orders-edge.componentValues" -}}
{{- if has .component (list "validate" "persist") -}}
{{- toYaml (index .root.Values.workers.jobs .component) -}}
{{- else -}}
{{- toYaml (index .root.Values .component) -}}
{{- end -}}
{{- end -}}

{{/*
Image reference: <repository>:<tag>[@<digest>]; tag defaults to the chart's appVersion. The image block is
the component's (edge.image, gateway.image, workers.image) over image.registry.
*/}}
{{- define "orders-edge.image" -}}
{{- $img := .image -}}
{{- $repo := $img.repository -}}
{{- if .root.Values.image.registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .root.Values.image.registry) $img.repository -}}
{{- end -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $repo $tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context: restricted PSS and OpenShift restricted-v2 (no fixed UID or GID). */}}
{{- define "orders-edge.podSecurityContext" -}}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context. */}}
{{- define "orders-edge.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
checkov findings that the chart answers by design rather than by changing the object; each carries its reason
(see docs/helm.md, "Offline validation"). Rendered into a workload's metadata.annotations.
*/}}
{{- define "orders-edge.checkovSkips" -}}
{{- $root := .root -}}
{{- with .image -}}
checkov.io/skip1: CKV_K8S_40=No fixed UID on purpose - OpenShift restricted-v2 assigns one from the namespace range; the images run as 65532 elsewhere
{{- if $.secrets }}
checkov.io/skip2: CKV_K8S_35=The services read their settings from environment variables only (figment); secrets come from secretKeyRef, never from the chart's values in clear
{{- end }}
{{- if not .digest }}
checkov.io/skip3: CKV_K8S_43=Image pinned by tag here; set the component's image.digest in production to pin by digest
{{- end }}
{{- end }}
{{- if not $root.Values.networkPolicy.enabled }}
checkov.io/skip4: CKV2_K8S_6=networkPolicy.enabled is false in these values (the cluster's own policies apply)
{{- end }}
{{- end -}}

{{/* Pod-level scheduling and plumbing shared by every workload. Input: dict root, component, values (c). */}}
{{- define "orders-edge.podCommon" -}}
{{- $root := .root -}}
{{- $c := .values -}}
serviceAccountName: {{ include "orders-edge.serviceAccountName" $root }}
automountServiceAccountToken: false
# The services refuse unknown EDGE_*/GATEWAY_*/WORKERS_* variables; Kubernetes' service links
# (<SERVICE>_PORT=...) for a Service named edge, gateway or workers would stop them from starting.
enableServiceLinks: false
securityContext:
  {{- include "orders-edge.podSecurityContext" $root | nindent 2 }}
{{- with $root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $c.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $c.topologySpread.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $c.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "orders-edge.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
  {{- if $c.topologySpread.zones }}
  - maxSkew: {{ $c.topologySpread.maxSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "orders-edge.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
  {{- end }}
{{- end }}
{{- end -}}

{{/* Probes on the admin port: liveness /healthz, readiness /readyz, startup /healthz. Input: dict c, port. */}}
{{- define "orders-edge.probes" -}}
{{- $p := .values.probes -}}
startupProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: {{ $p.startup.periodSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: {{ $p.liveness.periodSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: {{ $p.readiness.periodSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
  successThreshold: 1
  timeoutSeconds: {{ $p.timeoutSeconds }}
{{- end -}}

{{/* OpenTelemetry's standard environment. Input: dict root, service (service.name), attributes (optional). */}}
{{- define "orders-edge.otelEnv" -}}
{{- $o := .root.Values.otel -}}
{{- if $o.enabled }}
OTEL_SERVICE_NAME: {{ .service | quote }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ required "otel.endpoint is required when otel.enabled is true" $o.endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ $o.protocol | quote }}
OTEL_TRACES_SAMPLER: "parentbased_traceidratio"
OTEL_TRACES_SAMPLER_ARG: {{ $o.samplerRatio | toString | quote }}
{{- $attrs := list (printf "service.namespace=%s" .root.Release.Namespace) (printf "deployment.environment.name=%s" $o.environment) -}}
{{- range $k, $v := (merge (dict) (default (dict) .attributes) $o.resourceAttributes) }}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) -}}
{{- end }}
OTEL_RESOURCE_ATTRIBUTES: {{ join "," $attrs | quote }}
{{- end }}
{{- end -}}

{{/* Extra librdkafka properties as env: <PREFIX>KAFKA__PROPERTIES__<NAME with . as _>. Input: dict root, prefix. */}}
{{- define "orders-edge.kafkaPropertiesEnv" -}}
{{- $prefix := .prefix -}}
{{- range $k, $v := .root.Values.kafka.properties }}
{{ printf "%sKAFKA__PROPERTIES__%s" $prefix ($k | replace "." "_" | upper) }}: {{ $v | toString | quote }}
{{- end }}
{{- if .root.Values.kafka.caSecret.name }}
{{ printf "%sKAFKA__PROPERTIES__SSL_CA_LOCATION" $prefix }}: "/etc/orders/kafka-ca/{{ .root.Values.kafka.caSecret.key }}"
{{- end }}
{{- end -}}

{{/* Secret librdkafka properties (sasl.password, ...) as env from Secrets. Input: dict root, prefix. */}}
{{- define "orders-edge.kafkaSecretEnv" -}}
{{- $prefix := .prefix -}}
{{- range .root.Values.kafka.secretProperties }}
- name: {{ printf "%sKAFKA__PROPERTIES__%s" $prefix (.property | replace "." "_" | upper) }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end -}}

{{/* The database URL as env from a Secret (existing or the chart's). Input: dict root, prefix. */}}
{{- define "orders-edge.databaseEnv" -}}
{{- $db := .root.Values.database -}}
- name: {{ .prefix }}DATABASE__URL
  valueFrom:
    secretKeyRef:
      {{- if $db.existingSecret.name }}
      name: {{ $db.existingSecret.name }}
      key: {{ $db.existingSecret.key }}
      {{- else }}
      name: {{ include "orders-edge.fullname" .root }}-database
      key: url
      {{- end }}
{{- end -}}

{{/* Volumes and mounts for the Kafka CA (Strimzi's <cluster>-cluster-ca-cert) when set. */}}
{{- define "orders-edge.kafkaCaVolume" -}}
{{- if .Values.kafka.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.caSecret.name }}
    items:
      - key: {{ .Values.kafka.caSecret.key }}
        path: {{ .Values.kafka.caSecret.key }}
{{- end }}
{{- end -}}
{{- define "orders-edge.kafkaCaMount" -}}
{{- if .Values.kafka.caSecret.name }}
- name: kafka-ca
  mountPath: /etc/orders/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* The Kafka topic a worker job consumes (its input): validate <- commands, persist <- validated. */}}
{{- define "orders-edge.jobInputTopic" -}}
{{- if eq .component "validate" -}}commands{{- else -}}validated{{- end -}}
{{- end -}}

{{/*
Replica bounds of a worker job: never more consumers than the input topic has partitions (a consumer without
a partition idles, and KEDA would scale to it). Fails the render with the numbers.
*/}}
{{- define "orders-edge.checkJobReplicas" -}}
{{- $root := .root -}}
{{- $job := index $root.Values.workers.jobs .component -}}
{{- $topicKey := include "orders-edge.jobInputTopic" . -}}
{{- $topic := index $root.Values.kafka.topics $topicKey -}}
{{- $parts := int $topic.partitions -}}
{{- if gt (int $job.replicas) $parts -}}
{{- fail (printf "workers.jobs.%s.replicas (%d) is above the partitions of its input topic %s (kafka.topics.%s.partitions: %d)" .component (int $job.replicas) $topic.name $topicKey $parts) -}}
{{- end -}}
{{- if and $root.Values.keda.enabled (gt (int $job.keda.maxReplicas) $parts) -}}
{{- fail (printf "workers.jobs.%s.keda.maxReplicas (%d) is above the partitions of its input topic %s (kafka.topics.%s.partitions: %d)" .component (int $job.keda.maxReplicas) $topic.name $topicKey $parts) -}}
{{- end -}}
{{- if and (not $root.Values.keda.enabled) $job.autoscaling.enabled (gt (int $job.autoscaling.maxReplicas) $parts) -}}
{{- fail (printf "workers.jobs.%s.autoscaling.maxReplicas (%d) is above the partitions of its input topic %s (kafka.topics.%s.partitions: %d)" .component (int $job.autoscaling.maxReplicas) $topic.name $topicKey $parts) -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy peers that may scrape the admin port: the monitoring namespaces. */}}
{{- define "orders-edge.monitoringPeers" -}}
- namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values:
          {{- toYaml .Values.networkPolicy.monitoringNamespaces | nindent 10 }}
{{- end -}}

{{/* NetworkPolicy egress rules: DNS, plus the named external destinations. Input: dict root, targets (list). */}}
{{- define "orders-edge.egressRules" -}}
{{- $np := .root.Values.networkPolicy -}}
- ports:
    {{- range $np.dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- range .targets }}
{{- $t := index $np.egress . }}
{{- if and (eq . "otlp") (not $.root.Values.otel.enabled) }}{{ continue }}{{ end }}
- ports:
    {{- range $t.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $t.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* host:port for a listener, bracketing IPv6 addresses. Input: list address port. */}}
{{- define "orders-edge.hostPort" -}}
{{- $a := index . 0 -}}
{{- if contains ":" $a -}}[{{ $a }}]:{{ index . 1 }}{{- else -}}{{ $a }}:{{ index . 1 }}{{- end -}}
{{- end -}}

{{/* Secret holding the edge's certificate (tls.crt, tls.key); empty: development certificate. */}}
{{- define "orders-edge.edgeTlsSecret" -}}
{{- $t := .Values.edge.tls -}}
{{- if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else if or $t.certificate.enabled $t.openshiftServiceCA -}}
{{- include "orders-edge.componentName" (dict "root" . "component" "edge") -}}-tls
{{- end -}}
{{- end -}}

{{/* Name of the ConfigMap of rate-limit policies. */}}
{{- define "orders-edge.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "orders-edge.componentName" (dict "root" . "component" "edge"))) .Values.edge.policies.existingConfigMap -}}
{{- end -}}

{{/* Consistency checks that JSON Schema cannot express clearly; each fails the render with what to change. */}}
{{- define "orders-edge.validate" -}}
{{- $e := .Values.edge -}}
{{- $n := 0 -}}
{{- if $e.tls.existingSecret }}{{ $n = add1 $n }}{{ end -}}
{{- if $e.tls.certificate.enabled }}{{ $n = add1 $n }}{{ end -}}
{{- if $e.tls.openshiftServiceCA }}{{ $n = add1 $n }}{{ end -}}
{{- if gt $n 1 -}}
{{- fail "edge.tls: set only one of existingSecret, certificate.enabled and openshiftServiceCA" -}}
{{- end -}}
{{- if and $e.tls.certificate.enabled (not $e.tls.certificate.issuerRef.name) -}}
{{- fail "edge.tls.certificate.issuerRef.name is required when edge.tls.certificate.enabled is true" -}}
{{- end -}}
{{- if and (eq $e.expose "route") (eq $e.route.termination "reencrypt") (not $e.route.destinationCACertificate) (not $e.tls.openshiftServiceCA) -}}
{{- fail "edge.route.termination=reencrypt: the router must trust the edge's certificate: set edge.route.destinationCACertificate or edge.tls.openshiftServiceCA=true" -}}
{{- end -}}
{{- $edgeDrain := add $e.preStopSleepSeconds $e.shutdown.gracePeriodSecs $e.shutdown.timeoutSecs -}}
{{- if le (int $e.terminationGracePeriodSeconds) (int $edgeDrain) -}}
{{- fail (printf "edge.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + shutdown.gracePeriodSecs + shutdown.timeoutSecs (%d)" (int $e.terminationGracePeriodSeconds) (int $edgeDrain)) -}}
{{- end -}}
{{- $g := .Values.gateway -}}
{{- /* the gateway drains shutdownTimeoutSecs, then flushes its producer for up to 5 s */ -}}
{{- $gwDrain := add $g.preStopSleepSeconds $g.shutdownTimeoutSecs 5 -}}
{{- if le (int $g.terminationGracePeriodSeconds) (int $gwDrain) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + shutdownTimeoutSecs + 5 s of producer flush (%d)" (int $g.terminationGracePeriodSeconds) (int $gwDrain)) -}}
{{- end -}}
{{- if and (not .Values.database.existingSecret.name) (not .Values.database.url) -}}
{{- fail "database: set database.existingSecret.name (a Secret with the PostgreSQL URL) or database.url" -}}
{{- end -}}
{{- range $job := list "validate" "persist" -}}
{{- if (index $.Values.workers.jobs $job).enabled -}}
{{- include "orders-edge.checkJobReplicas" (dict "root" $ "component" $job) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* autoscaling/v2 HPA on CPU. Input: dict root, component, values (c) with autoscaling. */}}
{{- define "orders-edge.hpa" -}}
{{- $a := .values.autoscaling -}}
{{- $name := include "orders-edge.componentName" . -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "orders-edge.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* PodDisruptionBudget. Input: dict root, component, values (c) with pdb. */}}
{{- define "orders-edge.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "orders-edge.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "orders-edge.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  # Pods that never became ready may be evicted (a broken rollout must not block node drains).
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "orders-edge.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* ServiceMonitor of a component's admin Service. Input: dict root, component. */}}
{{- define "orders-edge.serviceMonitor" -}}
{{- $sm := .root.Values.monitoring.serviceMonitor -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "orders-edge.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "orders-edge.componentLabels" . | nindent 4 }}
    {{- with $sm.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "orders-edge.selectorLabels" . | nindent 6 }}
      orders-edge/port: admin
  namespaceSelector:
    matchNames:
      - {{ .root.Release.Namespace }}
  endpoints:
    - port: admin
      path: /metrics
      scheme: http
      interval: {{ $sm.interval }}
      scrapeTimeout: {{ $sm.scrapeTimeout }}
      honorLabels: false
{{- end -}}

{{/* The OpenTelemetry environment as a container env list (per worker job). Input: dict root, service. */}}
{{- define "orders-edge.otelEnvList" -}}
{{- $m := include "orders-edge.otelEnv" . | fromYaml -}}
{{- range $k := keys $m | sortAlpha }}
- name: {{ $k }}
  value: {{ index $m $k | quote }}
{{- end }}
{{- end -}}
