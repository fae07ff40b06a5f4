#!/usr/bin/env bash
# Fetches Debian's generic kernel through apt and lays out what macvm boots:
#   DIR/vmlinux   uncompressed ELF (QEMU boots it through PVH, ~1 s faster than the bzImage under TCG)
#   DIR/vmlinuz   the bzImage as shipped (for hypervisors that want it)
#   DIR/config    the kernel's build configuration
#   DIR/modules/  the .ko files the guest agent loads (virtio-mmio, console, 9p, blk, ext4, overlay, erofs, net,
#                 bridge)
#                 plus their dependencies, flat; macvm-mkinitrd orders them into /lib/modules/load.list
#   DIR/version   the package and its version; DIR/.complete marks a finished run and holds the module list
#                 (the cache key: a changed list fetches again).
# The generic kernel, not the cloud one: only it has 9p (as modules). Idempotent: a complete DIR is left alone
# (delete it, or set MACVM_KERNEL_REFRESH=1, to fetch again).
# amd64 only for now; arm64 (linux-image-arm64, an Image.gz to gunzip instead of a bzImage) is future work.
set -euo pipefail
usage() { echo "usage: $0 DIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
dir=$1
repo=$(cd "$(dirname "$0")/.." && pwd)

# What the guest needs, by module name; dependencies are added from each module's .modinfo. bridge is for
# containers that make their own bridges (privileged pods, nested runtimes; critest's Privileged and capability
# specs run `brctl addbr`).
modules=(virtio_mmio virtio_console 9p 9pnet_virtio virtio_blk ext4 crc32c_generic overlay erofs virtio_net bridge)

arch=${GOARCH:-$(go env GOARCH 2>/dev/null || dpkg --print-architecture)}
case "$arch" in
amd64) meta=linux-image-amd64 ;;
*) echo "fetch-kernel: GOARCH=$arch is not supported yet (only amd64; arm64 is future work)" >&2; exit 1 ;;
esac

if [ -f "$dir/.complete" ] && [ -z "${MACVM_KERNEL_REFRESH:-}" ] && [ "$(cat "$dir/.complete")" = "${modules[*]}" ] &&
	[ -s "$dir/vmlinux" ] && [ -s "$dir/vmlinuz" ] && [ -d "$dir/modules" ]; then
	echo "fetch-kernel: $dir is complete ($(cat "$dir/version")), skipping"
	exit 0
fi

# The meta package names the real one (linux-image-6.1.0-NN-amd64); a fresh machine may need its lists first.
resolve() { apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
	echo "fetch-kernel: $meta unknown to apt-cache, running apt-get update" >&2
	apt-get update -qq
	pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve $meta to a kernel package" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt drops privileges to _apt for downloads: let it write here to avoid its warning.
chmod 0777 "$tmp"
# Stale lists can name a version the mirror has since dropped (kernel ABI bumps): refresh once and retry.
if ! (cd "$tmp" && apt-get download -q "$pkg" >/dev/null); then
	echo "fetch-kernel: downloading $pkg failed, refreshing the package lists" >&2
	apt-get update -qq
	pkg=$(resolve)
	(cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
fi
deb=$(ls "$tmp"/*.deb)
version=$(dpkg-deb -f "$deb" Version)
dpkg-deb -x "$deb" "$tmp/root"
kver=${pkg#linux-image-}
vmlinuz="$tmp/root/boot/vmlinuz-$kver"
tree="$tmp/root/lib/modules/$kver"
[ -f "$vmlinuz" ] && [ -d "$tree" ] || { echo "fetch-kernel: $deb lacks vmlinuz-$kver or lib/modules/$kver" >&2; exit 1; }

# Build into a fresh sibling directory and swap it in, so an interrupted run never looks complete.
mkdir -p "$(dirname "$dir")"
new="$dir.new.$$"
rm -rf "$new" && mkdir -p "$new"
tool="$tmp/macvm-kernel"
(cd "$repo" && go build -o "$tool" ./cmd/macvm-kernel)
"$tool" vmlinux -i "$vmlinuz" -o "$new/vmlinux"
"$tool" modules -tree "$tree" -o "$new/modules" "${modules[@]}" >"$new/modules.list"
cp "$vmlinuz" "$new/vmlinuz"
cp "$tmp/root/boot/config-$kver" "$new/config"
echo "$pkg $version" >"$new/version"
echo "${modules[*]}" >"$new/.complete"
rm -rf "$dir"
mv "$new" "$dir"
echo "fetch-kernel: $pkg $version -> $dir ($(wc -l <"$dir/modules.list") modules)"
