{{/* Chart name, truncated to a DNS-1123 label. */}}
{{- define "hps-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name for the operator's objects. */}}
{{- define "hps-operator.fullname" -}}
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

{{- define "hps-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hps-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "hps-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "hps-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hps-operator
{{- end }}

{{- define "hps-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hps-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hps-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "hps-operator.agentImage" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- end }}

{{- define "hps-operator.metricsEnabled" -}}
{{- if or .Values.metrics.enabled .Values.metrics.serviceMonitor.enabled }}true{{ end }}
{{- end }}

{{/*
The operator's permissions: exactly operator/kopf_handlers/permissions.py API_PERMISSIONS (the chart
tests keep them equal, and no wildcard). Namespaced rules go in a Role per watched namespace, or in
the ClusterRole when the operator serves every namespace; nodes are cluster-scoped either way.
*/}}
{{- define "hps-operator.namespacedRules" -}}
# EmbeddingModels: watch them, keep kopf's progress annotations and finalizer, read the live model
- apiGroups: ["hps.dev"]
  resources: ["embeddingmodels"]
  verbs: ["get", "list", "watch", "patch"]
# report status
- apiGroups: ["hps.dev"]
  resources: ["embeddingmodels/status"]
  verbs: ["patch"]
# children's owner references set blockOwnerDeletion, which needs this where owner reference
# permissions are enforced
- apiGroups: ["hps.dev"]
  resources: ["embeddingmodels/finalizers"]
  verbs: ["update"]
# the operator posts what it does (plans, rollout phases, errors) as Events on the EmbeddingModel
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# children of an EmbeddingModel, watched by label (server-side) and written by server-side apply:
# plan and config ConfigMaps, Redis and agent Services
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# the Redis password Secret: created once and never read back (pods read it by reference); the
# garbage collector removes it with its model. No access to any other Secret.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Redis and agent StatefulSets (read by name while one is replaced, as an immutable field changed)
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# loader and Redis Cluster bootstrap Jobs: a Job's name carries a hash of its spec, so a changed Job
# is a new Job (the stale one deleted), never an update
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# the agents' L1 hit and miss rates (prometheus-adapter), for models that autoscale their partitions
- apiGroups: ["custom.metrics.k8s.io"]
  resources: ["pods/hps_l1_hits_per_second", "pods/hps_l1_misses_per_second"]
  verbs: ["get"]
# the NetworkPolicies of a model (spec.network): who may reach its Redis and its agents
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# the agents' own ServiceAccount, one per model (no permission unless spec.security.auth); deleted
# with its model by the garbage collector
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "watch", "create", "patch"]
# the agents' serving certificate issued by cert-manager (spec.security.tls.issuerRef); listed, not
# watched: the kind exists only where cert-manager is installed
- apiGroups: ["cert-manager.io"]
  resources: ["certificates"]
  verbs: ["list", "create", "patch", "delete"]
{{- end }}

{{- define "hps-operator.clusterRules" -}}
# GPU topology (allocatable GPUs, the GPU-memory label, taints) of the nodes a model can use: read at
# each reconcile, watched so that nodes joining or leaving are acted on at once. kopf's CRD and
# namespace scanning is off, so no access to customresourcedefinitions or namespaces is needed.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
# pods: a model's own agent pods (the scheduler's word on pods it cannot place), and, only while some
# wait for GPUs, the running pods of the cluster, to count the GPUs still free on the nodes the model
# can use. Read only, never watched.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- if .Values.rbac.tokenReview }}
# spec.security.auth: agents check callers' tokens with TokenReview, for which the operator binds the
# model's agent ServiceAccount to system:auth-delegator in a ClusterRoleBinding (cluster-scoped, so
# labelled with its model's uid rather than owned: listed by label, deleted with the model)
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterrolebindings"]
  verbs: ["list", "create", "patch", "delete"]
# binding a ClusterRole needs "bind" on it: this one only
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  resourceNames: ["system:auth-delegator"]
  verbs: ["bind"]
{{- end }}
{{- end }}

{{- define "hps-operator.leaderRules" -}}
# the leader election Lease: read, created by the first replica, renewed by the leader
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end }}
