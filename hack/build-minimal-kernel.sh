#!/usr/bin/env bash
# Builds macvm's minimal guest kernel from Debian's linux-source-6.1 package.
#
#   hack/build-minimal-kernel.sh OUTDIR [x86_64|arm64]
#
# The config is `make tinyconfig` plus kernel/config-ARCH.fragment (merged with
# the kernel's own scripts/kconfig/merge_config.sh), then `make olddefconfig`.
# Every line of the fragment must survive into the final .config: an option
# whose dependencies are missing would otherwise vanish silently and show up
# only as a guest that cannot find its console or its 9p share.
#
# Writes OUTDIR/vmlinux (the uncompressed ELF: QEMU boots it through the PVH
# entry point, which saves ~1 s over a bzImage under TCG), OUTDIR/bzImage
# (x86_64) or OUTDIR/Image (arm64: Virtualization.framework needs an
# uncompressed Image), OUTDIR/config, and OUTDIR/build.sha256.
#
# Idempotent: when the outputs exist and build.sha256 matches the hash of the
# fragment, the source package version and
# this script's recipe number, it does nothing.
# Source is unpacked once under _output/kernel/src; each arch builds out of
# tree in _output/kernel/build-ARCH so x86_64 and arm64 share one source tree.
#
# Environment: JOBS (default 2), NICE (default 15), MACVM_KERNEL_CONFIG_ONLY=1
# stops after the config has been resolved and checked (seconds, no compile).
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [x86_64|arm64]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=$(mkdir -p "$1" && cd "$1" && pwd)
arch=${2:-$(uname -m)}
case $arch in
	x86_64 | amd64) arch=x86_64 karch=x86_64 cross= image=bzImage image_src=arch/x86/boot/bzImage ;;
	arm64 | aarch64) arch=arm64 karch=arm64 image=Image image_src=arch/arm64/boot/Image
		cross=$([[ $(uname -m) == aarch64 ]] && echo "" || echo aarch64-linux-gnu-) ;;
	*) echo "unsupported arch: $arch" >&2; usage ;;
esac
jobs=${JOBS:-2}
nice_level=${NICE:-15}
src_pkg=linux-source-6.1
fragment=$root/kernel/config-$arch.fragment
[[ -f $fragment ]] || { echo "missing $fragment" >&2; exit 1; }

log() { echo "build-minimal-kernel: $*" >&2; }

# ensure_packages installs what is missing, and only that: apt-get is slow
# even when there is nothing to do, and a rebuild should not need the network.
ensure_packages() {
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	log "installing ${missing[*]}"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >&2; then
		apt-get update -q >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >&2
	fi
}

pkgs=("$src_pkg" build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio)
[[ -n $cross ]] && pkgs+=(gcc-aarch64-linux-gnu)
ensure_packages "${pkgs[@]}"

src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")
# Bump recipe when a change to this script changes what it builds.
recipe=1
hash=$( (cat "$fragment"; echo "recipe=$recipe $src_pkg $src_version $arch") | sha256sum | cut -d' ' -f1)

outputs=("$outdir/vmlinux" "$outdir/$image")
if [[ ${MACVM_KERNEL_CONFIG_ONLY:-} != 1 && -f $outdir/build.sha256 && $(cat "$outdir/build.sha256") == "$hash" ]] &&
	ls "${outputs[@]}" >/dev/null 2>&1; then
	log "up to date: $outdir ($src_pkg $src_version, $arch)"
	exit 0
fi

# Unpack the source once per package version; a stamp marks a complete unpack
# so an interrupted tar is redone rather than built from.
work=$root/_output/kernel
srcdir=$work/src/$src_pkg
if [[ ! -f $srcdir/.macvm-unpacked || $(cat "$srcdir/.macvm-unpacked") != "$src_version" ]]; then
	log "unpacking /usr/src/$src_pkg.tar.xz ($src_version)"
	rm -rf "$srcdir"
	mkdir -p "$work/src"
	tar -xaf "/usr/src/$src_pkg.tar.xz" -C "$work/src"
	echo "$src_version" >"$srcdir/.macvm-unpacked"
fi

builddir=$work/build-$arch
mkdir -p "$builddir"
kmake() { make -C "$srcdir" O="$builddir" ARCH="$karch" ${cross:+CROSS_COMPILE=$cross} "$@"; }

log "configuring $arch: tinyconfig + $(basename "$fragment")"
kmake -s tinyconfig >/dev/null
# merge_config.sh -m only merges (no Kconfig run): olddefconfig then resolves
# the dependencies of what the fragment asked for.
(cd "$builddir" && ARCH=$karch CROSS_COMPILE=$cross "$srcdir/scripts/kconfig/merge_config.sh" -m -O "$builddir" \
	"$builddir/.config" "$fragment" >/dev/null)
kmake -s olddefconfig >&2

# Check that every option the fragment sets is what the resolved config has.
bad=0
while IFS= read -r line; do
	case $line in
		CONFIG_*=*) opt=${line%%=*} ;;
		"# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *} ;;
		*) continue ;;
	esac
	got=$(grep -E "^(# )?$opt[= ]" "$builddir/.config" || true)
	if [[ $line == *" is not set" ]]; then
		[[ -z $got || $got == "$line" ]] && continue
	elif [[ $got == "$line" ]]; then
		continue
	fi
	log "config mismatch: wanted '$line', got '${got:-<absent>}'"
	bad=1
done <"$fragment"
if [[ $bad != 0 ]]; then
	log "the fragment does not resolve: fix its dependencies ($builddir/.config)"
	exit 1
fi
log "config resolves: every fragment option is set"
if [[ ${MACVM_KERNEL_CONFIG_ONLY:-} == 1 ]]; then
	cp "$builddir/.config" "$outdir/config"
	exit 0
fi

log "building $arch (nice -n $nice_level make -j$jobs vmlinux $image)"
start=$(date +%s)
nice -n "$nice_level" make -C "$srcdir" O="$builddir" ARCH="$karch" ${cross:+CROSS_COMPILE=$cross} \
	-j"$jobs" -s vmlinux "$image" >&2
log "built in $(($(date +%s) - start)) s"

# Copy through temporary names so an interrupted copy never leaves a
# half-written kernel next to a matching hash.
rm -f "$outdir/build.sha256"
for f in vmlinux:vmlinux "$image_src:$image" .config:config; do
	cp "$builddir/${f%%:*}" "$outdir/${f##*:}.tmp"
	mv "$outdir/${f##*:}.tmp" "$outdir/${f##*:}"
done
echo "$hash" >"$outdir/build.sha256"
log "wrote $outdir/{vmlinux,$image,config}"
