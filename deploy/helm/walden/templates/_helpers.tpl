{{/* The release's base name. */}}
{{- define "walden.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A pipeline's objects: (dict "root" $ "pipeline" $p). */}}
{{- define "walden.pipelineName" -}}
{{- printf "%s-%s" (include "walden.fullname" .root) .pipeline.name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "walden.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: walden
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "walden.selectorLabels" -}}
app.kubernetes.io/name: walden
app.kubernetes.io/instance: {{ .root.Release.Name }}
walden.dev/pipeline: {{ .pipeline.name }}
{{- end -}}

{{- define "walden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "walden.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret a pipeline's WALDEN_* variables come from. */}}
{{- define "walden.secretName" -}}
{{- if .pipeline.existingSecret -}}
{{- .pipeline.existingSecret -}}
{{- else if .root.Values.secret.existingSecret -}}
{{- .root.Values.secret.existingSecret -}}
{{- else -}}
{{- include "walden.pipelineName" . -}}
{{- end -}}
{{- end -}}

{{/* A pipeline's metrics port: metrics.port, plus the pipeline's index in sidecar mode (its
containers share the database pod's network). */}}
{{- define "walden.port" -}}
{{- if eq .root.Values.mode "sidecar" -}}
{{- add .root.Values.metrics.port .index -}}
{{- else -}}
{{- .root.Values.metrics.port -}}
{{- end -}}
{{- end -}}

{{/* walden.toml of a pipeline: the shared config, the pipeline's over it, and what the chart
sets (metrics endpoint, spill directory). Sections of scalars, plus one level of sub-tables
(warehouse.storage_options). */}}
{{- define "walden.config" -}}
{{- $cfg := mergeOverwrite (deepCopy (.root.Values.config | default dict)) (deepCopy (.pipeline.config | default dict)) -}}
{{- $metrics := mergeOverwrite (get $cfg "metrics" | default dict) (dict "listen" (printf "0.0.0.0:%s" (include "walden.port" .))) -}}
{{- $_ := set $cfg "metrics" $metrics -}}
{{- $spill := mergeOverwrite (get $cfg "spill" | default dict) (dict "dir" "/var/lib/walden/spill") -}}
{{- $_ := set $cfg "spill" $spill -}}
{{- range $section, $keys := $cfg }}
[{{ $section }}]
{{- range $k, $v := $keys }}
{{- if not (kindIs "map" $v) }}
{{ $k }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $keys }}
{{- if kindIs "map" $v }}
[{{ $section }}.{{ $k }}]
{{- range $k2, $v2 := $v }}
{{ $k2 }} = {{ toJson $v2 }}
{{- end }}
{{- end }}
{{- end }}
{{ end }}
{{- end -}}

{{/* The walden container of a pipeline: (dict "root" $ "pipeline" $p "index" $i). */}}
{{- define "walden.container" -}}
{{- $v := .root.Values -}}
{{- $name := include "walden.pipelineName" . -}}
- name: {{ if eq $v.mode "sidecar" }}walden-{{ .pipeline.name }}{{ else }}walden{{ end }}
  image: "{{ $v.image.repository }}:{{ $v.image.tag | default .root.Chart.AppVersion }}"
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["run", "--config", "/etc/walden/walden.toml", "--log-format", "json"]
  envFrom:
    - secretRef:
        name: {{ include "walden.secretName" . }}
  ports:
    - name: {{ if eq $v.mode "sidecar" }}{{ printf "m-%s" .pipeline.name | trunc 15 | trimSuffix "-" }}{{ else }}metrics{{ end }}
      containerPort: {{ include "walden.port" . }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ include "walden.port" . }}
    periodSeconds: 10
    failureThreshold: 6
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ include "walden.port" . }}
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ $name }}-config
      mountPath: /etc/walden
      readOnly: true
    - name: {{ $name }}-spill
      mountPath: /var/lib/walden/spill
    - name: {{ $name }}-tmp
      mountPath: /tmp
{{- end -}}

{{/* The volumes of a pipeline's container. */}}
{{- define "walden.volumes" -}}
{{- $name := include "walden.pipelineName" . -}}
- name: {{ $name }}-config
  configMap:
    name: {{ $name }}-config
- name: {{ $name }}-spill
  emptyDir:
    sizeLimit: {{ .root.Values.spill.sizeLimit }}
- name: {{ $name }}-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}
