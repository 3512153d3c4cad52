{{/*
The pod template shared by the Deployment and the StatefulSet. The security settings here are
fixed, not values: non-root, read-only root filesystem, no privilege escalation, every capability
dropped, seccomp RuntimeDefault, no service-account token unless Vault Kubernetes auth needs one
(and then only a short-lived, projected one).
*/}}
{{- define "keygate.podTemplate" -}}
metadata:
  labels:
    {{- include "keygate.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Configuration changes roll the pods; policy changes do not (they reload in place).
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "keygate.serviceAccountName" . }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "keygate.terminationGracePeriodSeconds" . }}
  securityContext:
    runAsNonRoot: true
    {{- with .Values.securityContext.runAsUser }}
    runAsUser: {{ . }}
    {{- end }}
    {{- with .Values.securityContext.runAsGroup }}
    runAsGroup: {{ . }}
    {{- end }}
    {{- with .Values.securityContext.fsGroup }}
    fsGroup: {{ . }}
    fsGroupChangePolicy: OnRootMismatch
    {{- end }}
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: keygate
      image: {{ include "keygate.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        - --config
        - {{ include "keygate.paths.configFile" . }}
      ports:
        - name: proxy
          containerPort: {{ .Values.ports.proxy }}
          protocol: TCP
        - name: admin
          containerPort: {{ .Values.ports.admin }}
          protocol: TCP
        {{- if .Values.webhooks.enabled }}
        - name: webhooks
          containerPort: {{ .Values.ports.webhooks }}
          protocol: TCP
        {{- end }}
      {{- if or .Values.env (eq .Values.workload.kind "StatefulSet") }}
      env:
        {{- if eq .Values.workload.kind "StatefulSet" }}
        # A stable writer id per replica (audit.writer_id), from the pod's stable name.
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: KEYGATE_AUDIT__WRITER_ID
          value: {{ printf "%s$(POD_NAME)" (default (printf "%s." .Release.Namespace) .Values.wal.writerIdPrefix) | quote }}
        {{- end }}
        {{- with .Values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- with .Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      startupProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: admin
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
      lifecycle:
        preStop:
          # The `sleep` action (Kubernetes 1.30+): the distroless image has no sleep binary.
          sleep:
            seconds: {{ .Values.shutdown.preStopSleepSeconds }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        runAsNonRoot: true
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        privileged: false
        capabilities:
          drop:
            - ALL
        seccompProfile:
          type: RuntimeDefault
      volumeMounts:
        - name: config
          mountPath: {{ include "keygate.paths.configDir" . }}
          readOnly: true
        - name: policies
          mountPath: {{ include "keygate.paths.policiesDir" . }}
          readOnly: true
        - name: wal
          mountPath: {{ include "keygate.paths.dataDir" . }}
        - name: tmp
          mountPath: /tmp
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: {{ include "keygate.paths.tlsDir" . }}
          readOnly: true
        {{- if .Values.tls.clientCA.enabled }}
        - name: client-ca
          mountPath: {{ include "keygate.paths.clientCADir" . }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if .Values.auditKeys.secret.enabled }}
        - name: audit-keys
          mountPath: {{ include "keygate.paths.auditKeysDir" . }}
          readOnly: true
        {{- end }}
        {{- if include "keygate.vaultKubernetesAuth" . }}
        - name: vault-token
          mountPath: {{ include "keygate.paths.vaultTokenDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.limitStore.passwordSecret.name }}
        - name: redis-password
          mountPath: {{ include "keygate.paths.redisPasswordDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.limitStore.caSecret.name }}
        - name: redis-ca
          mountPath: {{ include "keygate.paths.redisCADir" . }}
          readOnly: true
        {{- end }}
        {{- if and .Values.webhooks.enabled .Values.webhooks.tls.enabled }}
        - name: webhook-tls
          mountPath: {{ include "keygate.paths.webhookTlsDir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "keygate.fullname" . }}-config
    - name: policies
      configMap:
        name: {{ include "keygate.policiesConfigMapName" . }}
    {{- if ne .Values.workload.kind "StatefulSet" }}
    - name: wal
      emptyDir:
        sizeLimit: {{ .Values.wal.emptyDir.sizeLimit }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if and .Values.webhooks.enabled .Values.webhooks.tls.enabled }}
    - name: webhook-tls
      secret:
        secretName: {{ required "webhooks.tls.secretName is required when webhooks.tls.enabled is true" .Values.webhooks.tls.secretName }}
        defaultMode: 288 # 0440: owner and fsGroup may read
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "tls.secretName is required when tls.enabled is true" .Values.tls.secretName }}
        defaultMode: 288 # 0440: owner and fsGroup may read
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- if .Values.tls.clientCA.enabled }}
    - name: client-ca
      secret:
        secretName: {{ include "keygate.clientCASecretName" . }}
        defaultMode: 288
        items:
          - key: {{ .Values.tls.clientCA.key }}
            path: {{ .Values.tls.clientCA.key }}
    {{- end }}
    {{- end }}
    {{- if .Values.auditKeys.secret.enabled }}
    - name: audit-keys
      secret:
        secretName: {{ include "keygate.auditKeysSecretName" . }}
        defaultMode: 288
        items:
          - key: kek
            path: kek
          - key: signing-key
            path: signing-key
    {{- end }}
    {{- if .Values.limitStore.passwordSecret.name }}
    - name: redis-password
      secret:
        secretName: {{ .Values.limitStore.passwordSecret.name }}
        defaultMode: 288
        items:
          - key: {{ .Values.limitStore.passwordSecret.key }}
            path: {{ .Values.limitStore.passwordSecret.key }}
    {{- end }}
    {{- if .Values.limitStore.caSecret.name }}
    - name: redis-ca
      secret:
        secretName: {{ .Values.limitStore.caSecret.name }}
        defaultMode: 288
        items:
          - key: {{ .Values.limitStore.caSecret.key }}
            path: {{ .Values.limitStore.caSecret.key }}
    {{- end }}
    {{- if include "keygate.vaultKubernetesAuth" . }}
    - name: vault-token
      projected:
        defaultMode: 288
        sources:
          - serviceAccountToken:
              path: token
              expirationSeconds: {{ .Values.vaultKubernetesAuth.expirationSeconds }}
              {{- with .Values.vaultKubernetesAuth.audience }}
              audience: {{ . }}
              {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml .Values.topologySpreadConstraints | nindent 4 }}
  {{- else }}
  topologySpreadConstraints:
    {{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
    - maxSkew: 1
      topologyKey: {{ . }}
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "keygate.selectorLabels" $ | nindent 10 }}
      {{- if ne $.Values.workload.kind "StatefulSet" }}
      # Count only the pods of the same revision, so a rollout does not skew the spread.
      matchLabelKeys:
        - pod-template-hash
      {{- end }}
    {{- end }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
