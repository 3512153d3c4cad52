{{/*
Names, labels and the keygate configuration file. The configuration is built here, in one place,
from .Values.config plus the keys the chart owns (listeners, policy folder, WAL folder, shutdown
timings), so that the file keygate reads and the pod that mounts it cannot disagree about paths.
*/}}

{{- define "keygate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keygate.fullname" -}}
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

{{- define "keygate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keygate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keygate.labels" -}}
helm.sh/chart: {{ include "keygate.chart" . }}
{{ include "keygate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keygate
{{- end }}

{{- define "keygate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keygate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "keygate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "keygate.policiesConfigMapName" -}}
{{- default (printf "%s-policies" (include "keygate.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{- define "keygate.auditKeysSecretName" -}}
{{- default (printf "%s-audit-keys" (include "keygate.fullname" .)) .Values.auditKeys.secret.name }}
{{- end }}

{{- define "keygate.clientCASecretName" -}}
{{- default .Values.tls.secretName .Values.tls.clientCA.secretName }}
{{- end }}

{{/* Where things are inside the pod. */}}
{{- define "keygate.paths.configDir" -}}/etc/keygate/config{{- end }}
{{- define "keygate.paths.configFile" -}}/etc/keygate/config/keygate.yaml{{- end }}
{{- define "keygate.paths.policiesDir" -}}/etc/keygate/policies{{- end }}
{{- define "keygate.paths.tlsDir" -}}/etc/keygate/tls{{- end }}
{{- define "keygate.paths.clientCADir" -}}/etc/keygate/client-ca{{- end }}
{{- define "keygate.paths.auditKeysDir" -}}/etc/keygate/audit-keys{{- end }}
{{- define "keygate.paths.dataDir" -}}/var/lib/keygate{{- end }}
{{- define "keygate.paths.walDir" -}}/var/lib/keygate/wal{{- end }}
{{- define "keygate.paths.vaultTokenDir" -}}/var/run/secrets/keygate/vault{{- end }}
{{- define "keygate.paths.redisPasswordDir" -}}/etc/keygate/redis{{- end }}
{{- define "keygate.paths.redisCADir" -}}/etc/keygate/redis-ca{{- end }}
{{- define "keygate.paths.webhookTlsDir" -}}/etc/keygate/webhook-tls{{- end }}
{{- define "keygate.paths.webhookStateDir" -}}/var/lib/keygate/webhooks{{- end }}

{{/* True (non-empty) when keygate logs in to Vault with its Kubernetes service-account token. */}}
{{- define "keygate.vaultKubernetesAuth" -}}
{{- $vault := (.Values.config.secrets | default dict).vault }}
{{- if and $vault $vault.auth }}
{{- if eq ($vault.auth.method | toString) "kubernetes" }}true{{ end }}
{{- end }}
{{- end }}

{{- define "keygate.listenAddress" -}}
{{- $host := .host }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- $host = printf "[%s]" $host }}
{{- end }}
{{- printf "%s:%d" $host (int .port) }}
{{- end }}

{{- define "keygate.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.drainSeconds .Values.shutdown.flushSeconds 10 }}
{{- end }}

{{/* The keygate configuration file (docs/configuration.md). */}}
{{- define "keygate.configFile" -}}
{{- $v := .Values }}
{{- $cfg := dict }}
{{- $listen := dict "address" (include "keygate.listenAddress" (dict "host" $v.bindAddress "port" $v.ports.proxy)) }}
{{- if $v.tls.enabled }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" (include "keygate.paths.tlsDir" .)) "key_file" (printf "%s/tls.key" (include "keygate.paths.tlsDir" .)) }}
{{- if $v.tls.clientCA.enabled }}
{{- $_ := set $tls "client_ca_file" (printf "%s/%s" (include "keygate.paths.clientCADir" .) $v.tls.clientCA.key) }}
{{- end }}
{{- $_ := set $listen "tls" $tls }}
{{- end }}
{{- $_ := set $cfg "listen" $listen }}
{{- $_ := set $cfg "admin" (dict "address" (include "keygate.listenAddress" (dict "host" $v.bindAddress "port" $v.ports.admin))) }}
{{- with $v.config.upstreams }}
{{- $_ := set $cfg "upstreams" . }}
{{- end }}
{{- $limits := deepCopy ($v.config.limits | default dict) }}
{{- $_ := set $limits "shutdown_grace" (printf "%ds" (int $v.shutdown.drainSeconds)) }}
{{- $_ := set $cfg "limits" $limits }}
{{- $_ := set $cfg "policies" (dict "dir" (include "keygate.paths.policiesDir" .)) }}
{{- with $v.config.log }}
{{- $_ := set $cfg "log" . }}
{{- end }}
{{- $secrets := deepCopy ($v.config.secrets | default dict) }}
{{- if include "keygate.vaultKubernetesAuth" . }}
{{- if not (hasKey $secrets.vault.auth "jwt_file") }}
{{- $_ := set $secrets.vault.auth "jwt_file" (printf "%s/token" (include "keygate.paths.vaultTokenDir" .)) }}
{{- end }}
{{- end }}
{{- if $secrets }}
{{- $_ := set $cfg "secrets" $secrets }}
{{- end }}
{{- $audit := deepCopy ($v.config.audit | default dict) }}
{{- $_ := set $audit "wal_dir" (include "keygate.paths.walDir" .) }}
{{- $_ := set $audit "shutdown_timeout" (printf "%ds" (int $v.shutdown.flushSeconds)) }}
{{- $_ := set $cfg "audit" $audit }}
{{- $store := deepCopy ($v.config.limit_store | default dict) }}
{{- if or $v.limitStore.passwordSecret.name $v.limitStore.caSecret.name }}
{{- $redis := $store.redis | default dict }}
{{- if and $v.limitStore.passwordSecret.name (not (hasKey $redis "password")) }}
{{- $_ := set $redis "password" (printf "file://%s/%s" (include "keygate.paths.redisPasswordDir" .) $v.limitStore.passwordSecret.key) }}
{{- end }}
{{- if $v.limitStore.caSecret.name }}
{{- $tls := $redis.tls | default dict }}
{{- if not (hasKey $tls "ca_file") }}
{{- $_ := set $tls "ca_file" (printf "%s/%s" (include "keygate.paths.redisCADir" .) $v.limitStore.caSecret.key) }}
{{- end }}
{{- $_ := set $redis "tls" $tls }}
{{- end }}
{{- $_ := set $store "redis" $redis }}
{{- end }}
{{- if $store }}
{{- $_ := set $cfg "limit_store" $store }}
{{- end }}
{{- if $v.webhooks.enabled }}
{{- $webhooks := deepCopy ($v.config.webhooks | default dict) }}
{{- $wlisten := dict "address" (include "keygate.listenAddress" (dict "host" $v.bindAddress "port" $v.ports.webhooks)) }}
{{- if $v.webhooks.tls.enabled }}
{{- $_ := set $wlisten "tls" (dict "cert_file" (printf "%s/tls.crt" (include "keygate.paths.webhookTlsDir" .)) "key_file" (printf "%s/tls.key" (include "keygate.paths.webhookTlsDir" .))) }}
{{- end }}
{{- $_ := set $webhooks "listen" $wlisten }}
{{- $_ := set $webhooks "state_dir" (include "keygate.paths.webhookStateDir" .) }}
{{- $_ := set $cfg "webhooks" $webhooks }}
{{- end }}
{{- /* Passed as written (an empty `anomalies: {}` turns detection on with every default). */}}
{{- range $key := list "reconcile" "alerts" }}
{{- if hasKey $v.config $key }}
{{- $_ := set $cfg $key (index $v.config $key) }}
{{- end }}
{{- end }}
{{- /* The detectors' learned state goes to the data volume (the root filesystem is read-only). */}}
{{- if hasKey $v.config "anomalies" }}
{{- $anomalies := deepCopy (index $v.config "anomalies" | default dict) }}
{{- $live := $anomalies.live | default dict }}
{{- if not (hasKey $live "state_file") }}
{{- $_ := set $live "state_file" (printf "%s/anomalies-state.json" (include "keygate.paths.dataDir" .)) }}
{{- end }}
{{- $_ := set $anomalies "live" $live }}
{{- $_ := set $cfg "anomalies" $anomalies }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The policy files: the user's, or the inert example when there are none. */}}
{{- define "keygate.policyFiles" -}}
{{- if .Values.policies.files }}
{{- range $name, $policy := .Values.policies.files }}
{{ $name }}.yaml: |
{{- toYaml $policy | nindent 2 }}
{{- end }}
{{- else }}
example.yaml: |
  # Inert example installed because the release has no policies (policies.files). No token can
  # authenticate as this service, so nothing can use it. Replace it with one file per service.
  service: example
  stripe_key: env://STRIPE_SECRET_KEY
  mode: enforce
  rules:
    - id: read-balance
      effect: allow
      operation: GET /v1/balance
      key_mode: test
{{- end }}
{{- end }}

{{/*
checkov's Kubernetes checks that this chart skips, each with its reason (checkov reads
`checkov.io/skipN: CHECK_ID=reason` annotations). Every other check must pass.
*/}}
{{- define "keygate.checkovSkips" -}}
{{- $skips := list }}
{{- if not .Values.image.digest }}
{{- $skips = append $skips "CKV_K8S_43=the image is pinned by digest only when image.digest is set; a chart cannot know the digest of an image built after it, so the default is the appVersion tag" }}
{{- end }}
{{- if $skips }}
annotations:
  {{- range $i, $skip := $skips }}
  checkov.io/skip{{ add1 $i }}: {{ $skip | quote }}
  {{- end }}
{{- end }}
{{- end }}
