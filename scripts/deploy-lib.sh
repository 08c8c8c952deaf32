#!/usr/bin/env bash
# shellcheck disable=SC2034  # the constants below are used by the scripts that source this file
# Shared helpers for scripts/deploy.sh, func-deploy.sh, prequantize-job.sh, broker-trigger.sh and
# enable-knative-features.sh. Sourced, not run. Every command that changes the cluster goes through `run`, which in
# dry-run mode (DRY_RUN=1) prints it instead, shell-quoted, one per line, prefixed with "+ ".

# Repository root (the manifests are read from here).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

# Defaults that match the manifests as committed (the tests check that they do): scripts replace these placeholders
# when rendering, so changing them here without changing the manifests would render nothing.
DEFAULT_IMAGE="registry.example.com/autoglm/autoglm-phone-9b:0.1.0"
DEFAULT_GPU_PRODUCT="NVIDIA-H100-80GB-HBM3"
DEFAULT_NAMESPACE_IN_MANIFESTS="default"
SERVICE_NAME="autoglm-phone-9b"
CACHE_FRONT_NAME="autoglm-phone-9b-cache"
PVC_NAME="autoglm-models"
JOB_NAME="autoglm-prequantize"
BROKER_NAME="autoglm"
TRIGGER_NAME="autoglm-chat-requests"
SERVED_MODEL_NAME="autoglm-phone-9b"

# Knative feature flags (knative-serving/config-features) that service.yaml needs, and the value each must have.
# nodeSelector/tolerations are accepted when "allowed" too; PVCs and PVC writes only when "enabled".
SERVING_FEATURE_FLAGS=(
  kubernetes.podspec-nodeselector
  kubernetes.podspec-tolerations
  kubernetes.podspec-persistent-volume-claim
  kubernetes.podspec-persistent-volume-write
)
# knative-eventing/config-features: Trigger delivery.timeout.
EVENTING_FEATURE_FLAGS=(
  delivery-timeout
)

DRY_RUN="${DRY_RUN:-0}"

# Lower-case (bash 3.2, macOS's /bin/bash, has no ${var,,}).
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# Print a command shell-quoted, as it would run.
print_cmd() {
  local out="+" arg
  for arg in "$@"; do
    out+=" $(printf '%q' "$arg")"
  done
  printf '%s\n' "$out"
}

# Run a command that changes something, or print it in dry-run mode.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd "$@"
  else
    "$@"
  fi
}

# Require a command-line tool (only a warning in dry-run mode, which runs nothing).
need() {
  local tool="$1" why="$2"
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [[ "$DRY_RUN" == 1 ]]; then
      warn "$tool not found ($why); continuing because this is a dry run"
    else
      die "$tool not found: $why"
    fi
  fi
}

# Escape a string for use as a literal in a sed regular expression (| is the delimiter used below).
sed_literal() { printf '%s' "$1" | sed -e 's/[][\.*^$|/]/\\&/g'; }

# render FILE IMAGE NAMESPACE GPU_PRODUCT: print FILE with the image, the namespace in cluster-local URLs and the GPU
# product label replaced.
render() {
  local file="$1" image="$2" namespace="$3" gpu="$4"
  sed -e "s|$(sed_literal "$DEFAULT_IMAGE")|$(sed_literal "$image")|g" \
      -e "s|\\.$(sed_literal "$DEFAULT_NAMESPACE_IN_MANIFESTS")\\.svc\\.cluster\\.local|.$(sed_literal "$namespace").svc.cluster.local|g" \
      -e "s|nvidia.com/gpu.product: $(sed_literal "$DEFAULT_GPU_PRODUCT")|nvidia.com/gpu.product: $(sed_literal "$gpu")|g" \
      "$file"
}

# select_docs KIND [API_VERSION_PREFIX]: from a multi-document YAML on stdin, print the documents of that kind.
select_docs() {
  local kind="$1" api="${2:-}"
  awk -v kind="$kind" -v api="$api" '
    function flush() {
      if (doc != "" && matched_kind && (api == "" || matched_api)) { printf "%s---\n", doc }
      doc = ""; matched_kind = 0; matched_api = 0
    }
    /^---[[:space:]]*$/ { flush(); next }
    {
      doc = doc $0 "\n"
      if ($0 == "kind: " kind) matched_kind = 1
      if (api != "" && index($0, "apiVersion: " api) == 1) matched_api = 1
    }
    END { flush() }
  '
}

# Rendered manifests go to a temporary directory of the calling script, removed when it exits. (Created here, in the
# script's own shell: a directory created inside $(...) would be gone when that subshell ends.)
TMP_DIR="$(mktemp -d)"
trap 'rm -rf "$TMP_DIR"' EXIT

# Write stdin to a new file in TMP_DIR and print its path.
tmp_file() {
  local f
  f="$(mktemp "$TMP_DIR/manifest.XXXXXX")"
  cat >"$f"
  printf '%s\n' "$f"
}

# In a dry run with SHOW_MANIFESTS=1, print a rendered manifest after the command that uses it, each line
# prefixed with "| ".
show_manifest() {
  if [[ "$DRY_RUN" == 1 && "${SHOW_MANIFESTS:-0}" == 1 ]]; then
    sed -e 's/^/| /' "$1"
  fi
}

# kubectl apply of a rendered manifest.
apply_manifest() {
  local file="$1" namespace="$2"
  run kubectl apply -n "$namespace" -f "$file"
  show_manifest "$file"
}

# Current namespace of the kubeconfig context, or "default".
current_namespace() {
  local ns=""
  if command -v kubectl >/dev/null 2>&1; then
    ns="$(kubectl config view --minify -o 'jsonpath={..namespace}' 2>/dev/null || true)"
  fi
  printf '%s\n' "${ns:-default}"
}

# Check the Knative feature flags this deployment needs. Returns non-zero (and lists them) if some are off.
check_serving_features() {
  local flag value missing=()
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd kubectl get configmap config-features -n knative-serving -o 'jsonpath={.data}'
    return 0
  fi
  for flag in "${SERVING_FEATURE_FLAGS[@]}"; do
    value="$(kubectl get configmap config-features -n knative-serving \
      -o "jsonpath={.data.${flag//./\\.}}" 2>/dev/null || true)"
    value="$(lower "$value")"
    case "$flag" in
      kubernetes.podspec-persistent-volume-*) [[ "$value" == enabled ]] || missing+=("$flag=${value:-disabled}") ;;
      *) [[ "$value" == enabled || "$value" == allowed ]] || missing+=("$flag=${value:-disabled}") ;;
    esac
  done
  if ((${#missing[@]})); then
    warn "Knative Serving feature flags not enabled: ${missing[*]}"
    warn "run scripts/enable-knative-features.sh (cluster admin), or pass --enable-features"
    return 1
  fi
  log "Knative Serving feature flags OK: ${SERVING_FEATURE_FLAGS[*]}"
}

# wait_ksvc_ready NAME NAMESPACE TIMEOUT_SECONDS: wait until the Service's newest generation is observed, its latest
# created revision is the latest ready one and Ready=True. Fails fast when the latest revision fails (e.g.
# ProgressDeadlineExceeded, image pull errors), printing the revision's conditions.
wait_ksvc_ready() {
  local name="$1" namespace="$2" timeout="$3"
  local jsonpath='{.metadata.generation}|{.status.observedGeneration}|{.status.conditions[?(@.type=="Ready")].status}|{.status.latestCreatedRevisionName}|{.status.latestReadyRevisionName}|{.status.conditions[?(@.type=="Ready")].message}'
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd kubectl get ksvc "$name" -n "$namespace" -o "jsonpath=$jsonpath"
    printf '# (polled every 10 s until Ready=True for the latest revision, at most %s s)\n' "$timeout"
    return 0
  fi
  local deadline=$((SECONDS + timeout)) gen obs ready created latest message
  log "waiting up to ${timeout}s for ksvc/$name to become ready (a GPU cold start takes minutes)"
  while :; do
    # (read returns non-zero at the unterminated last line; the fields are set all the same)
    IFS='|' read -r gen obs ready created latest message < <(
      kubectl get ksvc "$name" -n "$namespace" -o "jsonpath=$jsonpath" 2>/dev/null || true
    ) || true
    if [[ -n "$gen" && "$gen" == "$obs" ]]; then
      if [[ "$ready" == True && -n "$created" && "$created" == "$latest" ]]; then
        log "ksvc/$name is ready (revision $latest)"
        return 0
      fi
      if [[ "$ready" == False ]]; then
        warn "ksvc/$name is not ready: $message"
        kubectl get revision "$created" -n "$namespace" \
          -o 'jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}' >&2 || true
        return 1
      fi
    fi
    if ((SECONDS >= deadline)); then
      warn "timed out after ${timeout}s waiting for ksvc/$name; see: kubectl get revision,pods -n $namespace -l serving.knative.dev/service=$name"
      return 1
    fi
    sleep 10
  done
}

# Print the Service URL and a request that works against it.
print_usage_hint() {
  local name="$1" namespace="$2" url
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd kubectl get ksvc "$name" -n "$namespace" -o 'jsonpath={.status.url}'
    url="http://$name.$namespace.<your-knative-domain>"
  else
    url="$(kubectl get ksvc "$name" -n "$namespace" -o 'jsonpath={.status.url}')"
  fi
  cat <<EOF

Service URL: $url

  curl -sS "$url/v1/models"
  curl -sS "$url/v1/chat/completions" -H 'Content-Type: application/json' \\
    -d '{"model": "$SERVED_MODEL_NAME", "messages": [{"role": "user", "content": "Open the settings app."}], "max_tokens": 64}'

The first request after an idle period waits for a GPU cold start (minutes). If the domain has no DNS, send the
request to your ingress address with -H "Host: ${url#*://}".
EOF
}
