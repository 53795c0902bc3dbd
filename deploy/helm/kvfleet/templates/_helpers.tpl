{{/* The release's full name: at most 63 characters, as Kubernetes names are. */}}
{{- define "kvfleet.fullname" -}}
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

{{- define "kvfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvfleet
{{- end -}}

{{/* Labels that select one component's pods: (dict "root" $ "component" "replica") */}}
{{- define "kvfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ default .root.Chart.Name .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A component's pod labels: its selector labels and the release's (no key twice). */}}
{{- define "kvfleet.podLabels" -}}
{{ include "kvfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kvfleet
{{- end -}}

{{- define "kvfleet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kvfleet.serviceAccountName" -}}
{{- default (include "kvfleet.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kvfleet.poolName" -}}
{{- default (include "kvfleet.fullname" .) .Values.inferencePool.name -}}
{{- end -}}

{{/* The InferencePool's selector: the given labels, else the chart's replica pods (with
     disaggregation, those of every group: they all carry kvfleet.io/replica). */}}
{{- define "kvfleet.poolSelector" -}}
{{- if .Values.inferencePool.selector -}}
{{- toYaml .Values.inferencePool.selector -}}
{{- else if .Values.disaggregation.enabled -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
kvfleet.io/replica: "true"
{{- else -}}
{{- include "kvfleet.selectorLabels" (dict "root" . "component" "replica") -}}
{{- end -}}
{{- end -}}

{{/* Does some component read the Kubernetes API (InferencePool discovery)? "true" or "" */}}
{{- define "kvfleet.readsPool" -}}
{{- if or (and .Values.balancer.enabled (eq .Values.balancer.discovery "inferencePool")) (and .Values.picker.enabled (eq .Values.picker.discovery "inferencePool")) -}}
true
{{- end -}}
{{- end -}}

{{/* How a balancer or picker finds the replicas: kvfleet flags, one per line, for `args:`.
     (dict "root" $ "discovery" "dns"|"inferencePool") */}}
{{- define "kvfleet.discoveryArgs" -}}
{{- $root := .root -}}
{{- if eq .discovery "inferencePool" }}
{{- if not (or $root.Values.inferencePool.create $root.Values.inferencePool.name) }}
{{- fail "discovery=inferencePool needs a pool: set inferencePool.create=true (with picker.enabled=true), or inferencePool.name to an existing InferencePool in this namespace" }}
{{- end }}
- --inference-pool
- {{ printf "%s/%s" $root.Release.Namespace (include "kvfleet.poolName" $root) | quote }}
{{- else if eq .discovery "dns" }}
{{- if $root.Values.replicas.enabled }}
{{- range include "kvfleet.replicaGroups" $root | fromYamlArray }}
- --dns
- {{ printf "%s-%s.%s.svc.cluster.local:%d" (include "kvfleet.fullname" $root) .component $root.Release.Namespace (int $root.Values.replicas.port) | quote }}
{{- end }}
- --dns-events-port
- {{ $root.Values.replicas.kvEventsPort | quote }}
- --dns-replay-port
- {{ $root.Values.replicas.kvReplayPort | quote }}
{{- else }}
- --dns
- {{ required "replicas.enabled=false with DNS discovery: set replicas.dnsName to your replicas' headless Service (HOST:PORT)" $root.Values.replicas.dnsName | quote }}
{{- end }}
{{- else }}
{{- fail (printf "discovery must be dns or inferencePool, got %q" .discovery) }}
{{- end }}
{{- end -}}


{{/* The chart's replica groups, a YAML list (fromYamlArray): the unified group (role both; the
     only one, as before, without disaggregation.enabled; left out with disaggregation when
     replicas.count is 0), then the prefill and decode groups. `sends`: binds a KV block socket
     (prefill, both); `pulls`: pulls KV from peers (decode, both). */}}
{{- define "kvfleet.replicaGroups" -}}
{{- $d := .Values.disaggregation -}}
{{- $r := .Values.replicas -}}
{{- $groups := list -}}
{{- if or (not $d.enabled) (gt (int $r.count) 0) -}}
{{- $groups = append $groups (dict "component" "replica" "what" "replicas'" "count" $r.count "role" "both" "sends" $d.enabled "pulls" $d.enabled "extraArgs" list "resources" $r.resources "nodeSelector" $r.nodeSelector "tolerations" $r.tolerations "affinity" $r.affinity) -}}
{{- end -}}
{{- if $d.enabled -}}
{{- range $role := list "prefill" "decode" -}}
{{- $g := index $d $role -}}
{{- $groups = append $groups (dict "component" $role "what" (printf "%s replicas'" $role) "count" $g.count "role" $role "sends" (eq $role "prefill") "pulls" (eq $role "decode") "extraArgs" $g.extraArgs "resources" $g.resources "nodeSelector" $g.nodeSelector "tolerations" $g.tolerations "affinity" $g.affinity) -}}
{{- end -}}
{{- end -}}
{{- toYaml $groups -}}
{{- end -}}

{{/* --kv-transfer-peers of the replicas that pull KV: the DNS name of every pod that can be a
     pair's prefill side (the prefill group's and the unified group's, as the StatefulSets name
     them: POD.SERVICE.NAMESPACE.svc.cluster.local), then disaggregation.extraPeers. */}}
{{- define "kvfleet.kvTransferPeers" -}}
{{- $root := . -}}
{{- $peers := list -}}
{{- range include "kvfleet.replicaGroups" $root | fromYamlArray -}}
{{- if .sends -}}
{{- $svc := printf "%s-%s" (include "kvfleet.fullname" $root) .component -}}
{{- range $n := until (int .count) -}}
{{- $peers = append $peers (printf "%s-%d.%s.%s.svc.cluster.local" $svc $n $svc $root.Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join "," (concat $peers $root.Values.disaggregation.extraPeers) -}}
{{- end -}}
