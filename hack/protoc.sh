#!/usr/bin/env bash
# Regenerates the agent protocol's Go code from pkg/guest/api/v1/agent.proto.
# The plugins are the versions pinned as tools in go.mod; cgroups' metrics.proto
# is taken from the module cache under the import path its Go code registers.
set -euo pipefail
cd "$(dirname "$0")/.."
out=_output/protoc
rm -rf "$out" && mkdir -p "$out/bin" "$out/include/github.com/containerd/cgroups/cgroup2/stats"
go build -o "$out/bin/" google.golang.org/protobuf/cmd/protoc-gen-go github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc
cgroups=$(go list -m -f '{{.Dir}}' github.com/containerd/cgroups/v3)
cp "$cgroups/cgroup2/stats/metrics.proto" "$out/include/github.com/containerd/cgroups/cgroup2/stats/"
metrics=github.com/containerd/cgroups/cgroup2/stats/metrics.proto=github.com/containerd/cgroups/v3/cgroup2/stats
PATH="$PWD/$out/bin:$PATH" protoc \
	-I pkg/guest/api/v1 -I "$out/include" -I /usr/include \
	--go_out=paths=source_relative,M$metrics:pkg/guest/api/v1 \
	--go-ttrpc_out=paths=source_relative,M$metrics:pkg/guest/api/v1 \
	agent.proto
