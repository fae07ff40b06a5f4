#!/usr/bin/env bash
# Writes the module file the shim is built with (`make shim`: go build -modfile=DIR/go.mod):
# this repository's go.mod and go.sum plus one replace, of github.com/containerd/containerd/api
# by a copy of the pinned version without runtime/task/v3/shim_grpc.pb.go.
#
# Why: the shim serves containerd's task API over ttrpc only (containerd dials every v2 shim
# with ttrpc unless the shim's bootstrap says grpc, which this one never does). The task
# API's Go package also carries the gRPC stubs, and importing that package links all of
# google.golang.org/grpc and what it imports (net/http, crypto/tls and x509, html/template,
# golang.org/x/net/http2 and trace): 3.8 MB of the shim's 13.4 MB of code and read-only
# data. Every running shim touches nearly every 64 KiB window of its code at start-up
# (page faults map whole windows), so that code cost ~3.8 MiB of RSS per shim
# (docs/shim.md, "Memory"). Only the stub file is left out; nothing else in the copy
# differs from the module proxy's.
#
# Usage: hack/shim-modfile.sh DIR   (from the repository root; DIR is created)
set -euo pipefail

dir=${1:?usage: hack/shim-modfile.sh DIR}
api=github.com/containerd/containerd/api
stub=runtime/task/v3/shim_grpc.pb.go

go mod download "$api"
read -r src version < <(go list -m -f '{{.Dir}} {{.Version}}' "$api")
[ -f "$src/$stub" ] || { echo "shim-modfile: $src/$stub not found: has containerd's task API moved?" >&2; exit 1; }

mkdir -p "$dir"
copy=$dir/containerd-api
# The copy is refreshed when the pinned version changes.
if [ "$(cat "$copy/.macvm-version" 2>/dev/null)" != "$version" ]; then
	rm -rf "$copy"
	cp -r "$src" "$copy"
	chmod -R u+w "$copy"
	rm "$copy/$stub"
	echo "$version" >"$copy/.macvm-version"
fi
cp go.mod "$dir/go.mod"
cp go.sum "$dir/go.sum"
printf '\n// hack/shim-modfile.sh: the task API without its gRPC stubs.\nreplace %s => %s\n' "$api" "$(cd "$copy" && pwd)" >>"$dir/go.mod"
