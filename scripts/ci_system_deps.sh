#!/usr/bin/env bash
# System packages the cluster tests use (a real Slurm with munge; iproute2 for network namespaces).
# Best effort: where they cannot be installed, those tests skip and say why.
set -u
want=(slurm-wlm munge iproute2)
missing=()
for pkg in "${want[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "ci_system_deps: cannot install ${missing[*]} (need root and apt-get); their tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
(apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}") >/tmp/ci_system_deps.log 2>&1 \
  || echo "ci_system_deps: apt-get failed for ${missing[*]} (see /tmp/ci_system_deps.log); their tests will skip" >&2
