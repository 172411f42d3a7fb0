{{/* The run id: run.id, or the release name. */}}
{{- define "tunectl.run" -}}
{{- $id := .Values.run.id | default .Release.Name -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$" $id) -}}
{{- fail (printf "run.id %q must be DNS-1123 and at most 52 characters" $id) -}}
{{- end -}}
{{- $id -}}
{{- end -}}

{{/* Labels on every object; call with (dict "root" $ "component" "train" "stage" "train"). */}}
{{- define "tunectl.labels" -}}
app.kubernetes.io/name: tunectl
app.kubernetes.io/instance: {{ include "tunectl.run" .root }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: tunectl
app.kubernetes.io/managed-by: tunectl
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
tunectl.dev/run: {{ include "tunectl.run" .root }}
{{- with .root.Values.run.recipe }}
tunectl.dev/recipe: {{ . }}
{{- end }}
{{- with .stage }}
tunectl.dev/stage: {{ . }}
{{- end }}
{{- end -}}

{{- define "tunectl.image" -}}
{{- printf "%s%s:%s" .root.Values.image.registry .name .root.Values.image.tag -}}
{{- end -}}

{{/* S3 settings and credentials, by Secret reference only. */}}
{{- define "tunectl.s3env" -}}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.s3.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.Values.s3.secretAccessKeyKey }}}
{{- end }}
{{- end -}}

{{/* A stage's scheduling setting, or the shared default when the stage leaves it empty. */}}
{{- define "tunectl.pick" -}}
{{- $own := index .stage .key -}}
{{- if $own }}{{ toYaml $own }}{{ else }}{{ with index .root.Values.scheduling .key }}{{ toYaml . }}{{ end }}{{ end -}}
{{- end -}}

{{/* One stage's Job. Call with (dict "root" $ "stage" "train" "after" "" ). */}}
{{- define "tunectl.stageJob" -}}
{{- $root := .root -}}
{{- $name := .stage -}}
{{- $s := index $root.Values.stages $name -}}
{{- $run := include "tunectl.run" $root -}}
{{- $labels := dict "root" $root "component" $name "stage" $name -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $run }}-{{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "tunectl.labels" $labels | nindent 4 }}
    {{- if and $root.Values.kueue.queueName (not .after) }}
    kueue.x-k8s.io/queue-name: {{ $root.Values.kueue.queueName }}
    {{- end }}
  annotations:
    tunectl.dev/store: {{ $root.Values.run.store | quote }}
    {{- with .after }}
    # Created suspended; the reconciler releases it once {{ . }} has published its manifest.
    tunectl.dev/after: {{ . }}
    {{- with $root.Values.kueue.queueName }}
    tunectl.dev/queue-name: {{ . }}
    {{- end }}
    {{- end }}
spec:
  suspend: {{ if .after }}true{{ else }}false{{ end }}
  backoffLimit: {{ int $s.backoffLimit }}
  activeDeadlineSeconds: {{ int $s.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ int $root.Values.jobs.ttlSecondsAfterFinished }}
  podFailurePolicy:
    rules:
      # EX_CONFIG: bad recipe, data or model; a retry would fail the same way.
      - action: FailJob
        onExitCodes: {containerName: {{ $name }}, operator: In, values: [78]}
      # Preemption, eviction, node drain: not the stage's fault, retry without counting it.
      - action: Ignore
        onPodConditions: [{type: DisruptionTarget}]
  template:
    metadata:
      labels:
        {{- include "tunectl.labels" $labels | nindent 8 }}
      {{- with $root.Values.podAnnotations }}
      annotations: {{ toYaml . | nindent 8 }}
      {{- end }}
    spec:
      restartPolicy: Never
      # Stages talk to the store, never to the Kubernetes API.
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets: {{ toYaml . | nindent 8 }}
      {{- end }}
      securityContext: {{ toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with include "tunectl.pick" (dict "root" $root "stage" $s "key" "nodeSelector") }}
      nodeSelector: {{ . | nindent 8 }}
      {{- end }}
      {{- with include "tunectl.pick" (dict "root" $root "stage" $s "key" "tolerations") }}
      tolerations: {{ . | nindent 8 }}
      {{- end }}
      {{- with include "tunectl.pick" (dict "root" $root "stage" $s "key" "affinity") }}
      affinity: {{ . | nindent 8 }}
      {{- end }}
      {{- with ($s.priorityClassName | default $root.Values.scheduling.priorityClassName) }}
      priorityClassName: {{ . }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "tunectl.image" (dict "root" $root "name" $s.image) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- if $s.command }}
          command: {{ toJson $s.command }}
          {{- else }}
          command: [python, -m, tunectl_jobs.{{ $name }}]
          {{- end }}
          args: [--recipe, /etc/tunectl/recipe.yaml, --store, {{ $root.Values.run.store | quote }}, --run, {{ $run }}]
          # The stage keeps its phase, and on failure its error line, in the termination message: `tunectl status`
          # reads it from the pod, so a crash is named with where it happened, even after the node is gone.
          terminationMessagePath: /dev/termination-log
          terminationMessagePolicy: File
          env:
            - {name: TUNECTL_STATUS_FILE, value: /dev/termination-log}
            - {name: PYTHONUNBUFFERED, value: "1"}
            - {name: HOME, value: /scratch/home}
            - {name: TMPDIR, value: /scratch/tmp}
            - {name: HF_HOME, value: /scratch/hf}
            - {name: TUNECTL_S3_CACHE, value: /scratch/store}
            {{- include "tunectl.s3env" $root | nindent 12 }}
            {{- with $root.Values.huggingFace.tokenSecret }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef: {name: {{ . }}, key: {{ $root.Values.huggingFace.tokenKey }}}
            {{- end }}
          resources:
            {{- with $s.resources.requests }}
            requests: {{ toYaml . | nindent 14 }}
            {{- end }}
            {{- if or $s.resources.limits $s.gpus }}
            limits:
              {{- with $s.resources.limits }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              {{- if $s.gpus }}
              nvidia.com/gpu: {{ int $s.gpus }}
              {{- end }}
            {{- end }}
          securityContext: {{ toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - {name: recipe, mountPath: /etc/tunectl, readOnly: true}
            - {name: scratch, mountPath: /scratch}
            - {name: tmp, mountPath: /tmp}
            - {name: dshm, mountPath: /dev/shm}
      volumes:
        - name: recipe
          configMap:
            name: {{ $run }}-recipe
            items: [{key: recipe.yaml, path: recipe.yaml}]
        - name: scratch
          emptyDir: {sizeLimit: {{ $s.scratchSize }}}
        - name: tmp
          emptyDir: {sizeLimit: 1Gi}
        - name: dshm
          emptyDir: {medium: Memory, sizeLimit: {{ $s.shmSize }}}
{{- end -}}
