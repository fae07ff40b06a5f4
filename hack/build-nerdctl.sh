#!/usr/bin/env bash
# Builds nerdctl, pinned, for the network e2e tests (nerdctl run --runtime io.containerd.macvm.v1 -p ...).
#
# Usage: hack/build-nerdctl.sh BINDIR    (nerdctl lands in BINDIR/nerdctl)
#
# A plain `go install` of nerdctl is refused here (its version list / checksum lookups are), but the module
# zip is served by exact version: download it (its hash is pinned below instead of the checksum database),
# copy it out of the module cache, stub the nested test-only module mod/tigron (absent from the zip; only
# pkg/testutil, which cmd/nerdctl links, names its tig.T interface) and build it as the main module.
# Cached: nothing is built when BINDIR/nerdctl reports the pinned version. Cold: ~3-5 min on 2 cores.
set -euo pipefail

NERDCTL_VERSION=${NERDCTL_VERSION:-v2.2.0}
NERDCTL_SUM=h1:dTJO0gUak1FYg+PyG2+fc6L4Z3TIvH4T+Sa0vQFakAo=
MODULE=github.com/containerd/nerdctl/v2

. "$(dirname "$0")/lib/pinned.sh"
pinned_setup "$@"
BINDIR=$OUTDIR

# The build below is not `go install`, so its build info may not name the version: a stamp file backs it up.
up_to_date() {
	built_from "$BINDIR/nerdctl" "$MODULE" "$NERDCTL_VERSION" ||
		{ [ -x "$BINDIR/nerdctl" ] && [ "$(cat "$BINDIR/.nerdctl-version" 2>/dev/null)" = "$NERDCTL_VERSION" ]; }
}
if up_to_date; then
	echo "nerdctl $NERDCTL_VERSION already in $BINDIR"
	exit 0
fi

tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
echo "building nerdctl $NERDCTL_VERSION into $BINDIR (cold: ~5 min)"
json=$(cd "$tmp" && GONOSUMDB=github.com/containerd/nerdctl GOFLAGS=-mod=mod go mod download -json "$MODULE@$NERDCTL_VERSION")
sum=$(printf '%s\n' "$json" | awk -F'"' '$2 == "Sum" { print $4 }')
dir=$(printf '%s\n' "$json" | awk -F'"' '$2 == "Dir" { print $4 }')
if [ "$sum" != "$NERDCTL_SUM" ]; then
	echo "nerdctl $NERDCTL_VERSION: module hash $sum, want $NERDCTL_SUM" >&2
	exit 1
fi
cp -r "$dir" "$tmp/src"
chmod -R u+w "$tmp/src"
mkdir -p "$tmp/src/mod/tigron/tig"
cat >"$tmp/src/mod/tigron/go.mod" <<'MOD'
module github.com/containerd/nerdctl/mod/tigron

go 1.24
MOD
cat >"$tmp/src/mod/tigron/tig/tig.go" <<'GO'
// Package tig is a stand-in for nerdctl's test-only tigron module, which its module zip lacks.
package tig

// T is the part of testing.T that nerdctl's non-test code names.
type T interface {
	Helper()
	FailNow()
	Log(args ...any)
	Name() string
}
GO
(cd "$tmp/src" && GOFLAGS=-mod=mod GONOSUMDB=github.com/containerd/nerdctl CGO_ENABLED=0 \
	go build -trimpath -ldflags "-s -w -X github.com/containerd/nerdctl/v2/pkg/version.Version=$NERDCTL_VERSION" \
	-o "$BINDIR/nerdctl" ./cmd/nerdctl)
echo "$NERDCTL_VERSION" >"$BINDIR/.nerdctl-version"
echo "nerdctl $NERDCTL_VERSION installed in $BINDIR"
