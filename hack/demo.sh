#!/usr/bin/env bash
# A short tour of macvm through plain ctr: a private containerd (everything under one temp dir, the
# machine's own containerd untouched), the e2e busybox image, one container run in its own VM, and one
# detached container with its exec, ps and metrics. Everything it starts is stopped by PID on exit.
#
# Usage: hack/demo.sh   (run by `make demo`, which builds the shim, boot files and containerd first)
# Env:   MACVM_BIN_DIR (default _output/bin), MACVM_BOOT_DIR (default _output/boot), as root.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(cd "${MACVM_BIN_DIR:-$ROOT/_output/bin}" && pwd)
BOOT=$(cd "${MACVM_BOOT_DIR:-$ROOT/_output/boot}" && pwd)
RUNTIME=io.containerd.macvm.v1
IMAGE=docker.io/library/macvm-busybox:e2e
NS=demo

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
	export PATH="$PATH:/usr/local/go/bin"
fi
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it starts containerd)" >&2; exit 1; }
for f in "$BIN/containerd" "$BIN/ctr" "$BIN/containerd-shim-macvm-v1" "$BOOT/vmlinux" "$BOOT/initrd.img"; do
	[ -e "$f" ] || { echo "demo: $f is missing: run \`make demo\` (it builds shim, boot and containerd)" >&2; exit 1; }
done

# A short directory: unix socket paths below it must stay under 108 bytes.
DIR=$(mktemp -d /tmp/macvm-demo.XXXXXX)
CTRD_PID=
cleanup() {
	local rc=$?
	set +e
	if [ -n "$CTRD_PID" ] && kill -0 "$CTRD_PID" 2>/dev/null; then
		# Containers first, so their shims and VMs exit; then containerd itself, by its PID.
		for id in $(ctr task ls -q 2>/dev/null); do
			ctr task kill -s SIGKILL "$id" >/dev/null 2>&1
		done
		for id in $(ctr containers ls -q 2>/dev/null); do
			ctr task delete -f "$id" >/dev/null 2>&1
			ctr containers delete "$id" >/dev/null 2>&1
		done
		kill "$CTRD_PID"
		for _ in $(seq 100); do kill -0 "$CTRD_PID" 2>/dev/null || break; sleep 0.1; done
		kill -0 "$CTRD_PID" 2>/dev/null && kill -9 "$CTRD_PID"
		wait "$CTRD_PID" 2>/dev/null
	fi
	# Detach anything the run left mounted under our directory, then remove it.
	grep -o " $DIR/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
	rm -rf "$DIR"
	[ $rc -eq 0 ] && echo "== demo done; containerd stopped and $DIR removed"
	exit $rc
}
trap cleanup EXIT

cat >"$DIR/macvm.toml" <<EOF
kernel = "$BOOT/vmlinux"
initrd = "$BOOT/initrd.img"
EOF
cat >"$DIR/config.toml" <<EOF
version = 3
root = "$DIR/root"
state = "$DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images", "io.containerd.podsandbox.controller.v1.podsandbox"]

[grpc]
  address = "$DIR/containerd.sock"
[ttrpc]
  address = "$DIR/containerd.sock.ttrpc"

[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.shim.v1.manager']
  socket_dir = "$DIR/s"
  env = ["MACVM_CONFIG=$DIR/macvm.toml"]
[plugins.'io.containerd.internal.v1.opt']
  path = "$DIR/opt"
EOF

# ctr prints a cgroup v1 deprecation warning on every call on these hosts; keep the demo readable.
ctr() { "$BIN/ctr" --address "$DIR/containerd.sock" --namespace "$NS" "$@" 2> >(grep -v 'cgroup v1' >&2); }
say() { printf '\n== %s\n' "$*"; }

say "starting a private containerd in $DIR"
# containerd finds containerd-shim-macvm-v1 through its PATH.
PATH="$BIN:$PATH" "$BIN/containerd" --config "$DIR/config.toml" >"$DIR/containerd.log" 2>&1 &
CTRD_PID=$!
for _ in $(seq 300); do
	[ -S "$DIR/containerd.sock" ] && ctr version >/dev/null 2>&1 && break
	kill -0 "$CTRD_PID" 2>/dev/null || { tail -20 "$DIR/containerd.log" >&2; exit 1; }
	sleep 0.1
done
ctr version | sed -n '/Server/,$p'

say "importing the busybox test image (built from Debian's busybox-static)"
(cd "$ROOT" && go run ./e2e/cmd/mkbusybox "$DIR/busybox.tar")
ctr images import "$DIR/busybox.tar" >/dev/null
ctr images ls -q

say "host kernel: $(uname -r)"
say "ctr run --rm --runtime $RUNTIME $IMAGE hello sh -c 'uname -a; head /proc/cpuinfo'"
start=$(date +%s%N)
ctr run --rm --runtime "$RUNTIME" "$IMAGE" hello sh -c 'uname -a; head /proc/cpuinfo'
echo "($(( ($(date +%s%N) - start) / 1000000 )) ms, VM boot included)"

say "a detached container: ctr run -d ... worker"
ctr run -d --runtime "$RUNTIME" "$IMAGE" worker sh -c 'while true; do echo tick >/dev/null; sleep 1; done'
ctr task ls
say "ctr task exec worker: processes seen inside its VM"
ctr task exec --exec-id ps1 worker ps
say "ctr task ps worker"
ctr task ps worker
say "ctr task metrics worker"
ctr task metrics worker
say "ctr task kill worker; delete"
ctr task kill -s SIGKILL worker
for _ in $(seq 100); do
	[ "$(ctr task ls | awk '$1 == "worker" { print $3 }')" = STOPPED ] && break
	sleep 0.2
done
ctr task delete worker
ctr containers delete worker
ctr task ls
