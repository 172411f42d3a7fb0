{{/* The run id: run.id, or the release name. */}}
{{- define "tunectl.run" -}}
{{- $id := .Values.run.id | default .Release.Name -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$" $id) -}}
{{- fail (printf "run.id %q must be DNS-1123 and at most 52 characters" $id) -}}
{{- end -}}
{{- $id -}}
{{- end -}}

{{/* The release namespace, refused unless a DNS-1123 label: it is written into every object. */}}
{{- define "tunectl.namespace" -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" .Release.Namespace) -}}
{{- fail (printf "namespace %q must be a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters)" .Release.Namespace) -}}
{{- end -}}
{{- .Release.Namespace | quote -}}
{{- end -}}

{{/* run.stages as "train,merge,gguf": a list (values files) or a comma-joined string (tunectl passes it with
--set-literal, which outranks every other way of setting values). Each stage is known and named once. */}}
{{- define "tunectl.stages" -}}
{{- $stages := .Values.run.stages -}}
{{- if kindIs "string" $stages }}{{ $stages = splitList "," $stages }}{{ end -}}
{{- range $stages }}
{{- if not (has . (list "train" "merge" "gguf")) }}{{ fail (printf "run.stages: unknown stage %q (train, merge, gguf)" (toString .)) }}{{ end }}
{{- end }}
{{- if or (not $stages) (ne (len $stages) (len (uniq $stages))) }}{{ fail "run.stages must name each of train, merge, gguf at most once, and at least one" }}{{ end }}
{{- join "," $stages -}}
{{- end -}}

{{/* Labels on every object; call with (dict "root" $ "component" "train" "stage" "train"). */}}
{{- define "tunectl.labels" -}}
app.kubernetes.io/name: tunectl
app.kubernetes.io/instance: {{ include "tunectl.run" .root }}
app.kubernetes.io/component: {{ .component | quote }}
app.kubernetes.io/part-of: tunectl
app.kubernetes.io/managed-by: tunectl
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
tunectl.dev/run: {{ include "tunectl.run" .root }}
{{- with .root.Values.run.recipe }}
tunectl.dev/recipe: {{ . | quote }}
{{- end }}
{{- with .stage }}
tunectl.dev/stage: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The quoted image reference; values.schema.json holds each part to the image reference grammar. */}}
{{- define "tunectl.image" -}}
{{- printf "%s%s:%s" .root.Values.image.registry .name .root.Values.image.tag | quote -}}
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
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.s3.accessKeyIdKey | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.s3.secretAccessKeyKey | quote }}}
{{- end }}
{{- end -}}

{{/* The pod's sandbox process is PID 1, not the program: the kernel drops a signal sent to a namespace's init
process that set no handler for it, so a Python PID 1 would ignore SIGTERM (eviction, preemption, cancel: the pod
waits out its grace period and dies of SIGKILL) and could not re-raise a fatal signal after reporting it. */}}
{{- define "tunectl.notPid1" -}}
shareProcessNamespace: true
{{- end }}

{{/* The node's network for a pod, where the values ask for it; its DNS then stays the cluster's. */}}
{{- define "tunectl.hostNetwork" -}}
{{- if .Values.hostNetwork -}}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end -}}
{{- end }}

{{/* A stage's scheduling setting, or the shared default when the stage leaves it empty. */}}
{{- define "tunectl.pick" -}}
{{- $own := index .stage .key -}}
{{- if $own }}{{ toYaml $own }}{{ else }}{{ with index .root.Values.scheduling .key }}{{ toYaml . }}{{ end }}{{ end -}}
{{- end -}}

{{/* How many nodes (pods) a stage's Job runs on at once: the recipe's training.nnodes for train, else 1. */}}
{{- define "tunectl.nodes" -}}
{{- $n := 1 -}}
{{- if eq .stage "train" -}}
{{- $recipe := fromYaml (.root.Values.recipe | default "") | default dict -}}
{{- $n = ($recipe.training | default dict).nnodes | default 1 -}}
{{- end -}}
{{- int $n -}}
{{- end -}}

{{/* Where the train pods of a run across nodes meet, quoted: pod 0 of the Indexed Job, by its name in the run's
headless Service (an Indexed Job's pod is named <job>-<index> in DNS), unless the values name a host. */}}
{{- define "tunectl.rendezvous" -}}
{{- $run := include "tunectl.run" .root -}}
{{- $r := .root.Values.stages.train.rendezvous -}}
{{- printf "%s:%d" ($r.host | default (printf "%s-train-0.%s-train" $run $run)) (int $r.port) | quote -}}
{{- end -}}

{{/* One stage's Job. Call with (dict "root" $ "stage" "train" "after" "" ). */}}
{{- define "tunectl.stageJob" -}}
{{- $root := .root -}}
{{- $name := .stage -}}
{{- $s := index $root.Values.stages $name -}}
{{- $run := include "tunectl.run" $root -}}
{{- $labels := dict "root" $root "component" $name "stage" $name -}}
{{- $nodes := int (include "tunectl.nodes" (dict "root" $root "stage" $name)) -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $run }}-{{ $name }}
  namespace: {{ include "tunectl.namespace" $root }}
  labels:
    {{- include "tunectl.labels" $labels | nindent 4 }}
    {{- if and $root.Values.kueue.queueName (not .after) }}
    kueue.x-k8s.io/queue-name: {{ $root.Values.kueue.queueName | quote }}
    {{- end }}
  annotations:
    tunectl.dev/store: {{ $root.Values.run.store | quote }}
    {{- with .after }}
    # Created suspended; the reconciler releases it once the stage named below has published its manifest.
    tunectl.dev/after: {{ . | quote }}
    {{- with $root.Values.kueue.queueName }}
    tunectl.dev/queue-name: {{ . | quote }}
    {{- end }}
    {{- end }}
spec:
  suspend: {{ if .after }}true{{ else }}false{{ end }}
  backoffLimit: {{ int $s.backoffLimit }}
  activeDeadlineSeconds: {{ int $s.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ int $root.Values.jobs.ttlSecondsAfterFinished }}
  {{- if gt $nodes 1 }}
  # One pod per node, all at once (Kueue admits them as one workload); each knows its index (JOB_COMPLETION_INDEX).
  completionMode: Indexed
  completions: {{ int $nodes }}
  parallelism: {{ int $nodes }}
  {{- end }}
  podFailurePolicy:
    rules:
      # EX_CONFIG: bad recipe, data or model; a retry would fail the same way.
      - action: FailJob
        onExitCodes: {containerName: {{ $name | quote }}, operator: In, values: [78]}
      # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint (a pod deleted, a Ctrl-C); the retry resumes.
      - action: Ignore
        onExitCodes: {containerName: {{ $name | quote }}, operator: In, values: [75]}
      {{- if gt $nodes 1 }}
      # EX_PROTOCOL: another node of the training group went away, and with it this pod's collectives. Its
      # replacement rejoins the group, which resumes from the checkpoint; only the node that failed is counted.
      - action: Ignore
        onExitCodes: {containerName: {{ $name | quote }}, operator: In, values: [76]}
      {{- end }}
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
      {{- if gt $nodes 1 }}
      # Gives pod N the DNS name <job>-N.<job> through the run's headless Service.
      subdomain: {{ $run }}-{{ $name }}
      {{- end }}
      {{- include "tunectl.notPid1" . | nindent 6 }}
      terminationGracePeriodSeconds: {{ int $s.terminationGracePeriodSeconds }}
      # Stages talk to the store, never to the Kubernetes API.
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets: {{ toYaml . | nindent 8 }}
      {{- end }}
      securityContext: {{ toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- include "tunectl.hostNetwork" $root | nindent 6 }}
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
      priorityClassName: {{ . | quote }}
      {{- end }}
      containers:
        - name: {{ $name | quote }}
          image: {{ include "tunectl.image" (dict "root" $root "name" $s.image) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy | quote }}
          {{- if $s.command }}
          command: {{ toJson $s.command }}
          {{- else }}
          command: [python, -m, tunectl_jobs.{{ $name }}]
          {{- end }}
          args: [--recipe, /etc/tunectl/recipe.yaml, --store, {{ $root.Values.run.store | quote }}, --run, {{ $run | quote }}]
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
            {{- if gt $nodes 1 }}
            - {name: TUNECTL_RDZV_ENDPOINT, value: {{ include "tunectl.rendezvous" $labels }}}
            {{- end }}
            {{- include "tunectl.s3env" $root | nindent 12 }}
            {{- with $root.Values.huggingFace.tokenSecret }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef: {name: {{ . | quote }}, key: {{ $root.Values.huggingFace.tokenKey | quote }}}
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
          emptyDir: {sizeLimit: {{ $s.scratchSize | quote }}}
        - name: tmp
          emptyDir: {sizeLimit: 1Gi}
        - name: dshm
          emptyDir: {medium: Memory, sizeLimit: {{ $s.shmSize | quote }}}
{{- end -}}
