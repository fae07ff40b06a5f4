#!/usr/bin/env bash
# Builds the CNI reference plugins the network e2e tests (and the CRI tests) use, pinned to one version:
# bridge, host-local, loopback, portmap, firewall (nerdctl's default network chains bridge + portmap +
# firewall + tuning).
#
# Usage: hack/build-cni-plugins.sh DIR    (the plugins land in DIR, e.g. _output/bin/cni)
#
# Cached: when every plugin exists in DIR and was built from the pinned module version, nothing is built.
set -euo pipefail

CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.10.0}
MODULE=github.com/containernetworking/plugins
PLUGINS=(main/bridge ipam/host-local main/loopback meta/portmap meta/firewall meta/tuning)

. "$(dirname "$0")/lib/pinned.sh"
pinned_setup "$@"
DIR=$OUTDIR

up_to_date() {
	local p
	for p in "${PLUGINS[@]}"; do
		built_from "$DIR/${p##*/}" "$MODULE" "$CNI_PLUGINS_VERSION" || return 1
	done
}

if up_to_date; then
	echo "CNI plugins $CNI_PLUGINS_VERSION already in $DIR"
	exit 0
fi

pkgs=()
for p in "${PLUGINS[@]}"; do
	pkgs+=("$MODULE/plugins/$p@$CNI_PLUGINS_VERSION")
done
echo "building CNI plugins $CNI_PLUGINS_VERSION into $DIR"
# Outside the repo, so the pinned version resolves on its own and never touches our go.mod.
(cd / && GOBIN="$DIR" GOFLAGS=-mod=mod CGO_ENABLED=0 go install "${pkgs[@]}")

if ! up_to_date; then
	echo "CNI plugins build finished but the binaries in $DIR do not report $CNI_PLUGINS_VERSION" >&2
	exit 1
fi
echo "CNI plugins $CNI_PLUGINS_VERSION installed in $DIR"
