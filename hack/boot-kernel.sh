#!/usr/bin/env bash
# Boots guest kernels under QEMU with kernel/smoke-init as /init, checks that
# each offers what the guest agent needs, and times the boots.
#
#   hack/boot-kernel.sh [-n RUNS] [-M microvm|q35] KERNEL_DIR...
#
# KERNEL_DIR holds vmlinux (booted through PVH) and, for a modular kernel,
# modules/ (packed into the initramfs with /lib/modules/load.list, which the
# smoke init loads the way the agent does). Runs are interleaved across the
# kernels (the machines are noisy) and the medians printed:
#   init   qemu exec -> the smoke init's first console line
#   ready  qemu exec -> every check done (modules loaded, agent port written,
#          9p share read, cgroup2/PSI/namespaces/pty/entropy present)
# Exits non-zero when any boot fails a check or does not finish.
#
# QEMU's command line and the kernel arguments mirror pkg/vm's (microvm,
# qemu64+rdrand, the tuned arguments of pkg/vm/cmdline.go): keep them in step
# so these numbers stay comparable with the shim's boots.
set -euo pipefail

runs=5
machine=microvm
while getopts n:M: opt; do
	case $opt in
		n) runs=$OPTARG ;;
		M) machine=$OPTARG ;;
		*) echo "usage: $0 [-n RUNS] [-M microvm|q35] KERNEL_DIR..." >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[[ $# -ge 1 ]] || { echo "usage: $0 [-n RUNS] [-M microvm|q35] KERNEL_DIR..." >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$root/_output/boot-kernel
mkdir -p "$work"

# The smoke init is static, pure Go, and packed by the project's own
# initramfs writer so the image layout is the agent's.
CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go -C "$root" build -trimpath -ldflags '-s -w' -o "$work/smoke-init" ./kernel/smoke-init
share=$work/share
mkdir -p "$share"
echo "hello from the host over 9p" >"$share/hello.txt"

dirs=()
names=()
for d in "$@"; do
	d=$(cd "$d" && pwd)
	[[ -f $d/vmlinux ]] || { echo "no vmlinux in $d" >&2; exit 1; }
	name=$(basename "$d")
	mods=()
	[[ -d $d/modules ]] && mods=(-modules "$d/modules")
	go -C "$root" run ./cmd/macvm-mkinitrd -agent "$work/smoke-init" "${mods[@]}" -o "$work/$name.initrd"
	dirs+=("$d")
	names+=("$name")
done

tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
cmdline="console=ttyS0 quiet panic=-1 tsc=reliable no_timer_check mitigations=off nokaslr 8250.nr_uarts=1"
cmdline+=" random.trust_cpu=on init_on_alloc=0 hardened_usercopy=off randomize_kstack_offset=off"
cmdline+=" page_alloc.shuffle=0 cryptomgr.notests audit=0 rdinit=/init tsc_early_khz=$tsc_khz macvm.channel=serial:agent"

case $machine in
	microvm)
		mopts=(-M microvm,x-option-roms=off,pit=off,pic=off)
		dev_serial=virtio-serial-device dev_9p=virtio-9p-device ;;
	q35)
		mopts=(-M q35)
		dev_serial=virtio-serial-pci dev_9p=virtio-9p-pci ;;
	*) echo "unknown machine $machine" >&2; exit 2 ;;
esac

# boot NAME DIR RUN: one boot; appends "NAME init ready ok" to $work/results.
boot() {
	local name=$1 dir=$2 run=$3 log=$work/$1.$3.log port=$work/$1.$3.port
	local t0 now t_init=- t_ready=- ok=0 line
	rm -f "$port"
	t0=$EPOCHREALTIME
	# timeout bounds a hung guest; qemu is its child and dies with it.
	while IFS= read -r line; do
		now=$EPOCHREALTIME
		line=${line%$'\r'}
		echo "$line" >>"$log"
		case $line in
			*"SMOKE: init "*) t_init=$(echo "$now - $t0" | bc) ;;
			*"SMOKE: ready "*) t_ready=$(echo "$now - $t0" | bc) ;;
			"SMOKE OK") ok=1 ;;
		esac
	done < <(timeout 120 qemu-system-x86_64 -nodefaults -no-user-config -accel tcg "${mopts[@]}" \
		-cpu qemu64,+rdrand -m 256 -smp 1 -nographic -serial stdio -no-reboot \
		-kernel "$dir/vmlinux" -initrd "$work/$name.initrd" -append "$cmdline" \
		-chardev file,path="$port",id=c0 -device "$dev_serial",id=vs0 -device virtserialport,bus=vs0.0,chardev=c0,name=agent \
		-fsdev local,id=fs0,path="$share",security_model=none -device "$dev_9p",fsdev=fs0,mount_tag=smoke \
		</dev/null 2>&1)
	if [[ $ok == 1 ]] && ! grep -q "^hello from vport" "$port" 2>/dev/null; then
		echo "$name run $run: the guest's line never reached the host through the agent port" >>"$log"
		ok=0
	fi
	echo "$name $t_init $t_ready $ok" >>"$work/results"
	printf '%-12s run %d: init %ss ready %ss %s\n' "$name" "$run" "$t_init" "$t_ready" "$([[ $ok == 1 ]] && echo ok || echo "FAILED (see $log)")"
}

rm -f "$work/results" "$work"/*.log
for ((r = 1; r <= runs; r++)); do
	for i in "${!dirs[@]}"; do
		boot "${names[$i]}" "${dirs[$i]}" "$r"
	done
done

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
printf '%-12s %8s %8s %s\n' kernel init ready "ok/runs ($machine, median of $runs)"
failed=0
for name in "${names[@]}"; do
	init=$(awk -v n="$name" '$1 == n && $2 != "-" { print $2 }' "$work/results" | median)
	ready=$(awk -v n="$name" '$1 == n && $3 != "-" { print $3 }' "$work/results" | median)
	oks=$(awk -v n="$name" '$1 == n && $4 == 1' "$work/results" | wc -l)
	printf '%-12s %7ss %7ss %d/%d\n' "$name" "$init" "$ready" "$oks" "$runs"
	[[ $oks == "$runs" ]] || failed=1
done
if [[ $failed != 0 ]]; then
	echo "some boots failed; the first failing log:" >&2
	for l in "$work"/*.log; do
		grep -q '^SMOKE OK' "$l" && ! grep -q 'never reached' "$l" && continue
		cat "$l" >&2
		break
	done
	exit 1
fi
