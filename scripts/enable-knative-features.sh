#!/usr/bin/env bash
# Enable the Knative feature flags that service.yaml and k8s/eventing.yaml need (cluster admin).
set -euo pipefail

# shellcheck source=scripts/deploy-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"

usage() {
  cat <<EOF
Usage: scripts/enable-knative-features.sh [--no-eventing] [--oidc] [--dry-run] [-h|--help]

Patches the Knative feature-flag ConfigMaps with kubectl (needs rights in knative-serving / knative-eventing):

  knative-serving/config-features:
$(printf '    %s: enabled\n' "${SERVING_FEATURE_FLAGS[@]}")
  knative-eventing/config-features:
$(printf '    %s: enabled\n' "${EVENTING_FEATURE_FLAGS[@]}")

These cannot safely be disabled again once Services use them. With the Knative Operator, set the same keys under
KnativeServing/KnativeEventing spec.config.features instead: the operator reverts direct ConfigMap edits.
k8s/config-features.yaml holds the same patches as YAML.

Options:
  --no-eventing   only patch knative-serving (no Knative Eventing installed)
  --oidc          also enable authentication-oidc in knative-eventing (Eventing >= 1.14): brokers then send
                  an OIDC sender token with every delivery, which the service verifies when EVENTS_OIDC_AUDIENCE
                  is set (docs/events.md). Enable transport-encryption too, so the token is not sent in clear.
  --dry-run       print the kubectl commands instead of running them
  -h, --help      show this help
EOF
}

EVENTING=1
OIDC=0
while (($#)); do
  case "$1" in
    --no-eventing) EVENTING=0 ;;
    --oidc) OIDC=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

need kubectl "patches the Knative config-features ConfigMaps"

# {"data":{"flag":"enabled",...}}
merge_patch() {
  local first=1 flag out='{"data":{'
  for flag in "$@"; do
    ((first)) || out+=','
    out+="\"$flag\":\"enabled\""
    first=0
  done
  printf '%s}}' "$out"
}

log "enabling in knative-serving/config-features: ${SERVING_FEATURE_FLAGS[*]}"
run kubectl patch configmap config-features -n knative-serving --type merge \
  -p "$(merge_patch "${SERVING_FEATURE_FLAGS[@]}")"

if ((EVENTING)); then
  eventing_flags=("${EVENTING_FEATURE_FLAGS[@]}")
  # optional, not needed by the manifests: Knative Eventing's OIDC sender identity (docs/events.md)
  ((OIDC)) && eventing_flags+=(authentication-oidc)
  log "enabling in knative-eventing/config-features: ${eventing_flags[*]}"
  run kubectl patch configmap config-features -n knative-eventing --type merge \
    -p "$(merge_patch "${eventing_flags[@]}")"
elif ((OIDC)); then
  die "--oidc needs Knative Eventing (drop --no-eventing)"
fi

log "done: the Knative webhooks pick up config-features changes within seconds, no restart needed"
