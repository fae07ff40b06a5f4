#!/usr/bin/env bash
# Builds the containerd daemon, ctr and the runc shim that the e2e tests and the demo drive, pinned to one
# version so test results do not drift with whatever containerd a machine happens to have.
#
# Usage: hack/build-containerd.sh BINDIR
#
# It is cached: when all three binaries already exist in BINDIR and report the pinned version, nothing is
# built (a cold build takes ~10 minutes on 2 cores, mostly module downloads).
set -euo pipefail

CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
BINARIES=(containerd ctr containerd-shim-runc-v2)

. "$(dirname "$0")/lib/pinned.sh"
pinned_setup "$@"
BINDIR=$OUTDIR

# up_to_date reports whether every binary exists and was built from the pinned module version.
up_to_date() {
	local b
	for b in "${BINARIES[@]}"; do
		built_from "$BINDIR/$b" github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" || return 1
	done
}

if up_to_date; then
	echo "containerd $CONTAINERD_VERSION already in $BINDIR"
	exit 0
fi

pkgs=()
for b in "${BINARIES[@]}"; do
	pkgs+=("github.com/containerd/containerd/v2/cmd/$b@$CONTAINERD_VERSION")
done
echo "building containerd $CONTAINERD_VERSION into $BINDIR (cold: ~10 min)"
# Run outside the repo so the pinned version is resolved on its own, never influenced by (or written into) our go.mod.
(cd / && GOBIN="$BINDIR" GOFLAGS=-mod=mod go install "${pkgs[@]}")

if ! up_to_date; then
	echo "containerd build finished but the binaries in $BINDIR do not report $CONTAINERD_VERSION" >&2
	exit 1
fi
echo "containerd $CONTAINERD_VERSION installed in $BINDIR"
