#!/usr/bin/env bash
# Installs macvm for a system containerd: the shim on containerd's PATH, the guest kernel and initramfs
# where the shim looks for them, and /etc/macvm/config.toml naming them. Then prints the containerd
# config.toml snippets that register the runtime (for CRI; ctr and the Go client need none).
#
# Usage: hack/install.sh            (run by `make install`, after `make build`)
# Env:   PREFIX     install prefix (default /usr/local): PREFIX/bin, PREFIX/share/macvm
#        DESTDIR    staging root for packaging (files land under DESTDIR, paths in the config do not)
#        CONFIG_DIR config directory (default /etc/macvm)
#        FORCE=1    overwrite an existing config.toml (the old one is kept as config.toml.bak)
#        MACVM_BIN_DIR / MACVM_BOOT_DIR  where the build outputs are (default _output/bin, _output/boot)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MACVM_BIN_DIR:-$ROOT/_output/bin}
BOOT=${MACVM_BOOT_DIR:-$ROOT/_output/boot}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
CONFIG_DIR=${CONFIG_DIR:-/etc/macvm}
SHARE=$PREFIX/share/macvm

for f in "$BIN/containerd-shim-macvm-v1" "$BIN/macvm-usernet" "$BOOT/vmlinux" "$BOOT/initrd.img"; do
	if [ ! -e "$f" ]; then
		echo "install: $f is missing: run \`make build\` first" >&2
		exit 1
	fi
done

install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$SHARE" "$DESTDIR$CONFIG_DIR"
install -m 0755 "$BIN/containerd-shim-macvm-v1" "$DESTDIR$PREFIX/bin/containerd-shim-macvm-v1"
# The user-space network's process; the shim looks for it beside itself.
install -m 0755 "$BIN/macvm-usernet" "$DESTDIR$PREFIX/bin/macvm-usernet"
# _output/boot/vmlinux is a symlink into the kernel build: install the file it points to.
install -m 0644 "$(readlink -f "$BOOT/vmlinux")" "$DESTDIR$SHARE/vmlinux"
install -m 0644 "$(readlink -f "$BOOT/initrd.img")" "$DESTDIR$SHARE/initrd.img"
echo "installed $PREFIX/bin/containerd-shim-macvm-v1, $PREFIX/bin/macvm-usernet and $SHARE/{vmlinux,initrd.img}${DESTDIR:+ under $DESTDIR}"

config=$DESTDIR$CONFIG_DIR/config.toml
if [ -e "$config" ] && [ "${FORCE:-0}" != 1 ]; then
	echo "kept the existing $CONFIG_DIR/config.toml (FORCE=1 replaces it)"
else
	[ -e "$config" ] && cp -p "$config" "$config.bak"
	hypervisor=$(command -v qemu-system-x86_64 || true)
	cat >"$config" <<EOF
# macvm shim configuration (containerd-shim-macvm-v1). Read when containerd passes no runtime
# options naming another file (ConfigPath) and MACVM_CONFIG is unset.
kernel = "$SHARE/vmlinux"
initrd = "$SHARE/initrd.img"
${hypervisor:+hypervisor = \"$hypervisor\"}
# cpus = 1
# default_memory_mib = 512   # VM memory when the container sets no memory limit
# memory_overhead_mib = 96   # added to the container's memory limit for the guest kernel and agent
# boot_timeout = "60s"
EOF
	chmod 0644 "$config"
	echo "wrote $CONFIG_DIR/config.toml${DESTDIR:+ under $DESTDIR}"
fi

cat <<EOF

containerd finds the shim through its PATH ($PREFIX/bin must be on the PATH of containerd's service).
With ctr, no containerd configuration is needed:

    ctr run --rm --runtime io.containerd.macvm.v1 docker.io/library/busybox:latest hello uname -a

For CRI (Kubernetes, crictl), add to /etc/containerd/config.toml (config version 3) and restart containerd:

    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.macvm]
      runtime_type = "io.containerd.macvm.v1"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.macvm.options]
        ConfigPath = "$CONFIG_DIR/config.toml"

then select it per pod with a RuntimeClass:

    apiVersion: node.k8s.io/v1
    kind: RuntimeClass
    metadata:
      name: macvm
    handler: macvm

To make it containerd's default runtime for CRI instead:

    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "macvm"
EOF
