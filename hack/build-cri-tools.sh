#!/usr/bin/env bash
# Builds the Kubernetes-side tools the CRI tests drive, pinned so results do not drift:
#   crictl    (sigs.k8s.io/cri-tools/cmd/crictl, go install)
#   critest   (the cri-tools validation suite; a ginkgo test binary, so `go test -c ./cmd/critest`
#              inside a copy of the cri-tools module: `go install` cannot build a _test package)
#   registry  (github.com/distribution/distribution/v3/cmd/registry): the local OCI registry that
#              serves critest's images, which are built locally (e2e/cmd/mkcriimages) since only the Go
#              module proxy is reachable.
#
# Usage: hack/build-cri-tools.sh BINDIR
#
# Cached: a binary whose embedded build info already names the pinned module version is not rebuilt.
# Cold, with an empty module cache, the three take ~5-8 minutes on 2 cores.
set -euo pipefail

CRI_TOOLS_VERSION=${CRI_TOOLS_VERSION:-v1.34.0}
REGISTRY_VERSION=${REGISTRY_VERSION:-v3.0.0}

. "$(dirname "$0")/lib/pinned.sh"
pinned_setup "$@"
BINDIR=$OUTDIR

# Outside the repo, so the pinned versions are resolved on their own and never touch our go.mod.
cd /

if built_from "$BINDIR/crictl" sigs.k8s.io/cri-tools "$CRI_TOOLS_VERSION"; then
	echo "crictl $CRI_TOOLS_VERSION already in $BINDIR"
else
	echo "building crictl $CRI_TOOLS_VERSION"
	GOBIN="$BINDIR" GOFLAGS=-mod=mod go install "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION"
fi

# critest's build info records the main module as "(devel)" when built from a copy, so the pinned version
# is kept in a stamp file next to it.
if [ -x "$BINDIR/critest" ] && [ "$(cat "$BINDIR/critest.version" 2>/dev/null)" = "$CRI_TOOLS_VERSION" ]; then
	echo "critest $CRI_TOOLS_VERSION already in $BINDIR"
else
	echo "building critest $CRI_TOOLS_VERSION"
	src=$(GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" | awk -F'"' '$2 == "Dir" { print $4 }')
	[ -d "$src" ] || { echo "cri-tools $CRI_TOOLS_VERSION: module download gave no directory" >&2; exit 1; }
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	cp -r "$src/." "$work/"
	chmod -R u+w "$work"
	# The module zip has no vendor/ tree; resolve dependencies from the module cache instead.
	(cd "$work" && GOFLAGS=-mod=mod go test -c -o "$BINDIR/critest" ./cmd/critest)
	echo "$CRI_TOOLS_VERSION" >"$BINDIR/critest.version"
fi

if built_from "$BINDIR/registry" github.com/distribution/distribution/v3 "$REGISTRY_VERSION"; then
	echo "registry $REGISTRY_VERSION already in $BINDIR"
else
	echo "building registry $REGISTRY_VERSION"
	GOBIN="$BINDIR" GOFLAGS=-mod=mod go install "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
fi
