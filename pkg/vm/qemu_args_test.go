package vm

import (
	"os"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func baseOptions() qemuOptions {
	return qemuOptions{Arch: "amd64", TSCKHz: 2096016, ConsolePath: "/s/console.log", QMPFD: 3, AgentFD: 4, Paused: true}
}

// argValue returns the values that follow every occurrence of flag.
func argValues(args []string, flag string) []string {
	var v []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			v = append(v, args[i+1])
		}
	}
	return v
}

func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag {
			return true
		}
	}
	return false
}

func TestQEMUArgsTCGDefaults(t *testing.T) {
	args, err := qemuArgs(Config{ID: "c1", Kernel: "/k/vmlinux", Initrd: "/k/initrd.img", KernelArgs: []string{"macvm.debug=1"}}, baseOptions())
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S"} {
		if !hasFlag(args, f) {
			t.Errorf("missing %s in %q", f, args)
		}
	}
	checks := map[string]string{
		"-accel":  "tcg,tb-size=128",
		"-cpu":    "qemu64,+rdrand",
		"-M":      "microvm,x-option-roms=off,pit=off,pic=off",
		"-smp":    "1",
		"-m":      "256",
		"-kernel": "/k/vmlinux",
		"-initrd": "/k/initrd.img",
		"-serial": "chardev:console",
		"-mon":    "chardev=qmpchr,mode=control",
	}
	for flag, want := range checks {
		if got := argValues(args, flag); len(got) != 1 || got[0] != want {
			t.Errorf("%s: got %q, want [%q]", flag, got, want)
		}
	}
	chardevs := strings.Join(argValues(args, "-chardev"), " ")
	for _, want := range []string{"file,id=console,path=/s/console.log", "socket,id=qmpchr,fd=3", "socket,id=agentchr,fd=4"} {
		if !strings.Contains(chardevs, want) {
			t.Errorf("chardevs %q lack %q", chardevs, want)
		}
	}
	devices := strings.Join(argValues(args, "-device"), " ")
	if !strings.Contains(devices, "virtserialport,bus=vser0.0,chardev=agentchr,name=agent,id=agent0") {
		t.Errorf("no agent port among devices %q", devices)
	}

	cmdline := argValues(args, "-append")[0]
	for _, want := range []string{"console=ttyS0", "tsc_early_khz=2096016", "macvm.channel=serial:agent", "rdinit=/init", "panic=-1", "pci=off"} {
		if !strings.Contains(cmdline, want) {
			t.Errorf("kernel command line %q lacks %q", cmdline, want)
		}
	}
	if !strings.HasSuffix(cmdline, " macvm.debug=1") {
		t.Errorf("caller's kernel args must come last: %q", cmdline)
	}
}

// A VM with more than one vCPU runs TCG on one host thread: with a thread
// per vCPU a guest patching its kernel text could hang (see qemuArgs and
// e2e/guest TestKernelTextPatching). One vCPU keeps QEMU's default.
func TestQEMUArgsTCGThreads(t *testing.T) {
	for cpus, want := range map[int]string{1: "tcg,tb-size=128", 2: "tcg,thread=single,tb-size=128", 4: "tcg,thread=single,tb-size=128"} {
		args, err := qemuArgs(Config{ID: "c1", Kernel: "/k/vmlinux", CPUs: cpus}, baseOptions())
		if err != nil {
			t.Fatal(err)
		}
		if got := argValues(args, "-accel"); len(got) != 1 || got[0] != want {
			t.Errorf("%d vCPUs: -accel %q, want [%q]", cpus, got, want)
		}
	}
}

func TestQEMUArgsKVMAndSizes(t *testing.T) {
	o := baseOptions()
	o.KVM, o.Paused, o.TSCKHz = true, false, 0
	args, err := qemuArgs(Config{Kernel: "/k", CPUs: 2, MemoryMiB: 1024}, o)
	if err != nil {
		t.Fatal(err)
	}
	if got := argValues(args, "-accel"); len(got) != 1 || got[0] != "kvm" {
		t.Errorf("-accel: got %q, want kvm", got)
	}
	if got := argValues(args, "-cpu"); len(got) != 1 || got[0] != "host" {
		t.Errorf("-cpu: got %q, want host", got)
	}
	if got := argValues(args, "-smp"); got[0] != "2" {
		t.Errorf("-smp: got %q", got)
	}
	if got := argValues(args, "-m"); got[0] != "1024" {
		t.Errorf("-m: got %q", got)
	}
	if hasFlag(args, "-S") || hasFlag(args, "-initrd") {
		t.Errorf("unexpected -S or -initrd in %q", args)
	}
	if strings.Contains(argValues(args, "-append")[0], "tsc_early_khz") {
		t.Error("tsc_early_khz given with an unknown TSC rate")
	}
}

func TestQEMUArgsSharesAndDisks(t *testing.T) {
	cfg := Config{
		Kernel: "/k",
		Shares: []Share{{Tag: "rootfs", HostPath: "/b/root,fs"}, {Tag: "ro.vol-1", HostPath: "/v", ReadOnly: true}},
		Disks:  []Disk{{Path: "/d/a.img"}, {Path: "/d/b.img", ReadOnly: true}},
	}
	args, err := qemuArgs(cfg, baseOptions())
	if err != nil {
		t.Fatal(err)
	}
	wantFsdev := []string{
		"local,id=fs0,path=/b/root,,fs,security_model=none,multidevs=remap", // comma escaped
		"local,id=fs1,path=/v,security_model=none,multidevs=remap,readonly=on",
	}
	if got := argValues(args, "-fsdev"); strings.Join(got, "|") != strings.Join(wantFsdev, "|") {
		t.Errorf("-fsdev: got %q, want %q", got, wantFsdev)
	}
	wantNodes := []string{
		"driver=file,node-name=disk0-file,filename=/d/a.img,read-only=off",
		"driver=raw,node-name=disk0,file=disk0-file,read-only=off",
		"driver=file,node-name=disk1-file,filename=/d/b.img,read-only=on",
		"driver=raw,node-name=disk1,file=disk1-file,read-only=on",
	}
	if got := argValues(args, "-blockdev"); strings.Join(got, "|") != strings.Join(wantNodes, "|") {
		t.Errorf("-blockdev: got %q, want %q", got, wantNodes)
	}
	devices := argValues(args, "-device")
	wantDevices := []string{
		"virtio-9p-device,fsdev=fs0,mount_tag=rootfs",
		"virtio-9p-device,fsdev=fs1,mount_tag=ro.vol-1",
		"virtio-blk-device,drive=disk0,serial=disk0,write-cache=on",
		"virtio-blk-device,drive=disk1,serial=disk1,write-cache=on",
	}
	if got := strings.Join(devices[len(devices)-4:], "|"); got != strings.Join(wantDevices, "|") {
		t.Errorf("devices: got %q, want %q", got, wantDevices)
	}
}

func TestQEMUArgsRejects(t *testing.T) {
	tests := []struct {
		name  string
		cfg   Config
		arch  string
		check func(error) bool
	}{
		{"no kernel", Config{}, "amd64", errdefs.IsInvalidArgument},
		{"arm64 not yet", Config{Kernel: "/k"}, "arm64", errdefs.IsNotImplemented},
		{"negative memory", Config{Kernel: "/k", MemoryMiB: -1}, "amd64", errdefs.IsInvalidArgument},
		{"empty tag", Config{Kernel: "/k", Shares: []Share{{HostPath: "/x"}}}, "amd64", errdefs.IsInvalidArgument},
		{"long tag", Config{Kernel: "/k", Shares: []Share{{Tag: strings.Repeat("t", 32), HostPath: "/x"}}}, "amd64", errdefs.IsInvalidArgument},
		{"tag with comma", Config{Kernel: "/k", Shares: []Share{{Tag: "a,b", HostPath: "/x"}}}, "amd64", errdefs.IsInvalidArgument},
		{"duplicate tag", Config{Kernel: "/k", Shares: []Share{{Tag: "a", HostPath: "/x"}, {Tag: "a", HostPath: "/y"}}}, "amd64", errdefs.IsInvalidArgument},
		{"share without path", Config{Kernel: "/k", Shares: []Share{{Tag: "a"}}}, "amd64", errdefs.IsInvalidArgument},
		{"disk without path", Config{Kernel: "/k", Disks: []Disk{{}}}, "amd64", errdefs.IsInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := baseOptions()
			o.Arch = tc.arch
			_, err := qemuArgs(tc.cfg, o)
			if !tc.check(err) {
				t.Errorf("got %v", err)
			}
		})
	}
}

func TestKernelCmdline(t *testing.T) {
	got := KernelCmdline("hvc0", 0, []string{"a=1", "b"})
	if !strings.HasPrefix(got, "console=hvc0 ") || !strings.HasSuffix(got, " "+AgentChannelArg+" a=1 b") {
		t.Errorf("got %q", got)
	}
	if strings.Contains(got, "tsc_early_khz") {
		t.Errorf("tsc_early_khz without a rate: %q", got)
	}
}

func TestTailFile(t *testing.T) {
	p := t.TempDir() + "/console.log"
	if got := tailFile(p, 10); got != "" {
		t.Errorf("missing file: got %q", got)
	}
	if err := writeFile(p, "0123456789abcdef"); err != nil {
		t.Fatal(err)
	}
	for n, want := range map[int]string{4: "cdef", 100: "0123456789abcdef", 0: ""} {
		if got := tailFile(p, n); got != want {
			t.Errorf("tail %d: got %q, want %q", n, got, want)
		}
	}
	if got := describeTail("console", " \n"); got != "console empty" {
		t.Errorf("empty tail: got %q", got)
	}
}

func writeFile(p, s string) error { return os.WriteFile(p, []byte(s), 0o644) }
