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

if [ $# -ne 1 ]; then
	echo "usage: $0 DIR" >&2
	exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd)

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
	export PATH="$PATH:/usr/local/go/bin"
fi

# go version -m reads the module version embedded in each binary: exact, unlike --version output.
up_to_date() {
	local p mod
	for p in "${PLUGINS[@]}"; do
		[ -x "$DIR/${p##*/}" ] || return 1
		mod=$(go version -m "$DIR/${p##*/}" 2>/dev/null | awk -v m="$MODULE" '$1 == "mod" && $2 == m { print $3 }')
		[ "$mod" = "$CNI_PLUGINS_VERSION" ] || return 1
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
