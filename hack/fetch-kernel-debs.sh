#!/usr/bin/env bash
# Downloads the Debian kernel packages that `macvm-kernel deb` is tested on, through apt:
#   DIR/linux-image-*-cloud-arm64_*.deb  what Apple-silicon Macs boot (virtio, vsock, virtiofs as modules)
#   DIR/linux-image-*-amd64_*.deb        the generic amd64 kernel (its xz payload gives QEMU a vmlinux)
# The arm64 package needs arm64 in dpkg's architectures; it is added (and the lists refreshed) if missing.
# It also installs qemu-system-arm, which the tests boot the arm64 result with.
# Cached: packages already in DIR are kept (set MACVM_KERNEL_REFRESH=1 to fetch again).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
mkdir -p "$dir"
if ! command -v qemu-system-aarch64 >/dev/null; then
	echo "fetch-kernel-debs: installing qemu-system-arm" >&2
	apt-get install -y -qq --no-install-recommends qemu-system-arm >&2 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-arm >&2; }
fi
if [ -z "${MACVM_KERNEL_REFRESH:-}" ] && ls "$dir"/linux-image-*-cloud-arm64_*_arm64.deb >/dev/null 2>&1 &&
	ls "$dir"/linux-image-*-amd64_*_amd64.deb 2>/dev/null | grep -vq cloud; then
	echo "fetch-kernel-debs: $dir has both packages, skipping"
	exit 0
fi

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
	echo "fetch-kernel-debs: adding arm64 to dpkg's architectures" >&2
	dpkg --add-architecture arm64
	apt-get update -qq
fi
# The meta packages name the real ones (linux-image-6.1.0-NN-...).
resolve() { apt-cache depends "$1" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'; }
arm=$(resolve linux-image-cloud-arm64:arm64)
amd=$(resolve linux-image-amd64)
if [ -z "$arm" ] || [ -z "$amd" ]; then
	apt-get update -qq
	arm=$(resolve linux-image-cloud-arm64:arm64)
	amd=$(resolve linux-image-amd64)
fi
[ -n "$arm" ] && [ -n "$amd" ] || { echo "fetch-kernel-debs: cannot resolve the kernel packages (arm64: '$arm', amd64: '$amd')" >&2; exit 1; }
arm=${arm%:arm64}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 0777 "$tmp" # apt downloads as _apt
if ! (cd "$tmp" && apt-get download -q "$arm:arm64" "$amd" >/dev/null); then
	# Stale lists can name a version the mirror has dropped: refresh once and retry.
	apt-get update -qq
	arm=$(resolve linux-image-cloud-arm64:arm64); arm=${arm%:arm64}
	amd=$(resolve linux-image-amd64)
	(cd "$tmp" && apt-get download -q "$arm:arm64" "$amd" >/dev/null)
fi
rm -f "$dir"/linux-image-*.deb
mv "$tmp"/*.deb "$dir"/
ls -1 "$dir"/*.deb
