{{/*
Full name: release-chart, or the release name alone when it already contains
the chart name; cut to 63 characters (a DNS label).
*/}}
{{- define "aldaas.fullname" -}}
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

{{- define "aldaas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aldaas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aldaas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "aldaas.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "aldaas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "aldaas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aldaas.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "aldaas.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "aldaas.clientImage" -}}
{{- $repository := default .Values.image.repository .Values.client.image -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.client.tag -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* The Secret holding `token` and `admin-token`. */}}
{{- define "aldaas.tokenSecretName" -}}
{{- if .Values.existingSecret -}}
{{- tpl .Values.existingSecret $ -}}
{{- else -}}
{{- include "aldaas.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* Whether the broker gets S3 keys from a Secret at all ("true" or ""). */}}
{{- define "aldaas.s3HasCredentials" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accesskey -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding `accesskey` and `secretkey` (the original's key names). */}}
{{- define "aldaas.s3SecretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- tpl .Values.s3.existingSecret $ -}}
{{- else if .Values.s3.accesskey -}}
{{- include "aldaas.fullname" . -}}
{{- end -}}
{{- end -}}

{{/*
A generated secret value that survives upgrades: the explicit value if given,
else what the release's Secret already holds (lookup; empty when rendering
offline), else a fresh random string.
Call with (dict "root" $ "key" "token" "value" .Values.tunnel.token).
*/}}
{{- define "aldaas.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "aldaas.fullname" .root) -}}
{{- $data := dict -}}
{{- if and $existing (hasKey $existing "data") -}}
{{- $data = $existing.data -}}
{{- end -}}
{{- if .value -}}
{{- .value -}}
{{- else if hasKey $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}

{{/* {requests: {...}, limits: {...}} with string quantities. */}}
{{- define "aldaas.resourceMap" -}}
{{- $out := dict -}}
{{- range $section, $quantities := . -}}
{{- $q := dict -}}
{{- range $name, $amount := $quantities -}}
{{- $_ := set $q $name (toString $amount) -}}
{{- end -}}
{{- $_ := set $out $section $q -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
Checks that JSON schema cannot express: relations between values.
*/}}
{{- define "aldaas.validate" -}}
{{- if gt (int .Values.lease.ttl) (int .Values.lease.maxTtl) -}}
{{- fail (printf "lease.ttl (%v) is longer than lease.maxTtl (%v): lower lease.ttl or raise lease.maxTtl." .Values.lease.ttl .Values.lease.maxTtl) -}}
{{- end -}}
{{- if gt (int .Values.lease.maxTtl) (int .Values.lease.maxLifetime) -}}
{{- fail (printf "lease.maxTtl (%v) is longer than lease.maxLifetime (%v): lower lease.maxTtl or raise lease.maxLifetime." .Values.lease.maxTtl .Values.lease.maxLifetime) -}}
{{- end -}}
{{- if and .Values.s3.accesskey (not .Values.s3.secretkey) (not .Values.s3.existingSecret) -}}
{{- fail "s3.accesskey is set but s3.secretkey is empty: set both, or name a Secret in s3.existingSecret." -}}
{{- end -}}
{{- range $step := list "application" "restore" "check" -}}
{{- $v := index $.Values $step -}}
{{- if $v.existingSecret -}}
{{- range (default (list) $v.env) -}}
{{- if include "aldaas.isSecretName" .name -}}
{{- fail (printf "%s.env has the secret entry %s while %s.existingSecret (%s) is set: put it in that Secret and remove it from %s.env." $step .name $step $v.existingSecret $step) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.s3.sessionToken (or .Values.s3.existingSecret (not .Values.s3.accesskey)) -}}
{{- fail "s3.sessionToken is set without s3.accesskey and s3.secretkey in values: set them too, or put the token in s3.existingSecret and name its key in s3.sessionTokenKey." -}}
{{- end -}}
{{- if and .Values.s3.sessionTokenKey (not .Values.s3.existingSecret) -}}
{{- fail (printf "s3.sessionTokenKey (%s) is set without s3.existingSecret: name the Secret, or give the token in s3.sessionToken." .Values.s3.sessionTokenKey) -}}
{{- end -}}
{{- with .Values.s3.caBundle -}}
{{- if and .configMap .secret -}}
{{- fail (printf "s3.caBundle.configMap (%s) and s3.caBundle.secret (%s) are both set: name the CA bundle's ConfigMap or its Secret, not both." .configMap .secret) -}}
{{- end -}}
{{- end -}}
{{- if and (include "aldaas.s3CaBundleVolume" .) .Values.s3.host .Values.s3.insecure -}}
{{- fail (printf "s3.caBundle is set but s3.insecure is true, so the broker speaks plain HTTP to %s and never uses the CA: set s3.insecure to false for HTTPS, or unset s3.caBundle." .Values.s3.host) -}}
{{- end -}}
{{- if eq (int .Values.tunnel.port) (int .Values.admin.port) -}}
{{- fail (printf "tunnel.port and admin.port are both %v: give the gateway and the admin server different ports." .Values.tunnel.port) -}}
{{- end -}}
{{- end -}}

{{/*
Whether an env variable's name marks a secret (a password, token, key or
credential): such entries of application/restore/check env go to a Secret
the pods read with envFrom, never into the ConfigMap.
*/}}
{{- define "aldaas.isSecretName" -}}
{{- if regexMatch "(?i)(pass|secret|token|credential|private)" . -}}true{{- end -}}
{{- end -}}

{{/*
One step's env split: {plain: {name: value}, secret: {name: value}}.
Call with the [{name, value}] list; read back with fromYaml.
*/}}
{{- define "aldaas.splitEnv" -}}
{{- $plain := dict -}}
{{- $secret := dict -}}
{{- range . -}}
{{- if include "aldaas.isSecretName" .name -}}
{{- $_ := set $secret .name (toString .value) -}}
{{- else -}}
{{- $_ := set $plain .name (toString .value) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "plain" $plain "secret" $secret) -}}
{{- end -}}

{{/*
The Secret a step's (application, restore, check) pods read with envFrom:
<step>.existingSecret if set, else the chart's <fullname>-<step> when the
step's env has secret entries, else empty.
Call with (dict "root" $ "step" "application" "values" .Values.application "env" $envList).
*/}}
{{- define "aldaas.envSecretName" -}}
{{- if .values.existingSecret -}}
{{- tpl .values.existingSecret .root -}}
{{- else if (fromYaml (include "aldaas.splitEnv" (default (list) .env))).secret -}}
{{- printf "%s-%s" (include "aldaas.fullname" .root | trunc 50 | trimSuffix "-") .step -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets ([{name}]) as the JSON list of names kubernetes.pods.image_pull_secrets takes. */}}
{{- define "aldaas.pullSecretNames" -}}
{{- $names := list -}}
{{- range (default (list) .Values.imagePullSecrets) -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- $names | toJson -}}
{{- end -}}

{{/* Key of the S3 Secret holding a session token: sessiontoken (s3.sessionToken), s3.sessionTokenKey, or empty. */}}
{{- define "aldaas.s3SessionTokenKey" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.sessionTokenKey -}}
{{- else if .Values.s3.sessionToken -}}
sessiontoken
{{- end -}}
{{- end -}}


{{/* A map with every value as a string, as JSON (a nodeSelector's `"true"` may arrive as a bool). */}}
{{- define "aldaas.stringMap" -}}
{{- $out := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $out $key (toString $value) -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/*
The volume source (configMap or secret, with the one key as ca-bundle.pem) of s3.caBundle,
or empty when no CA bundle is set. The provider's download container mounts the same key at
the same path (pool/providers/kubernetes/_manifests.py CA_BUNDLE_DIR, CA_BUNDLE_FILE).
*/}}
{{- define "aldaas.s3CaBundleVolume" -}}
{{- $ca := .Values.s3.caBundle | default (dict) -}}
{{- $items := list (dict "key" $ca.key "path" "ca-bundle.pem") -}}
{{- if $ca.configMap -}}
{{- toYaml (dict "configMap" (dict "name" $ca.configMap "items" $items)) -}}
{{- else if $ca.secret -}}
{{- toYaml (dict "secret" (dict "secretName" $ca.secret "items" $items)) -}}
{{- end -}}
{{- end -}}

{{- define "aldaas.s3CaBundleDir" -}}/etc/aldaas-s3-ca{{- end -}}

{{- define "aldaas.s3CaBundleFile" -}}{{ include "aldaas.s3CaBundleDir" . }}/ca-bundle.pem{{- end -}}
