package container

import (
	"encoding/json"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// warmConfigDecoder encodes and decodes a helperConfig shaped like a
// container's once, in a spare helper before it says idle: encoding/json
// builds its table of a struct type's fields, by reflection, the first
// time a process meets the type, and a spare is a fresh process. Under
// TCG those tables took most of the spare's 11-34 ms "config decode" of a
// pooled VM's first container (3.9 KB of JSON; trace with macvm.debug=1).
// The spare is started at boot and saved in the warm-start template, so
// clones and pooled VMs get the tables built.
func warmConfigDecoder() {
	b, err := json.Marshal(sampleHelperConfig())
	if err != nil {
		return
	}
	var cfg helperConfig
	_ = json.Unmarshal(b, &cfg)
	var msg helperMsg
	_ = json.Unmarshal([]byte(`{"type":"start"}`), &msg)
}

// sampleHelperConfig has every spec type a container engine fills in
// (containerd's default spec, CRI's resources and seccomp profile) set, so
// that decoding it visits them all.
func sampleHelperConfig() *helperConfig {
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	u32 := func(v uint32) *uint32 { return &v }
	caps := []string{"CAP_CHOWN", "CAP_KILL"}
	proc := &specs.Process{
		Terminal:    true,
		ConsoleSize: &specs.Box{Height: 24, Width: 80},
		User:        specs.User{UID: 1, GID: 1, Umask: u32(0o22), AdditionalGids: []uint32{2}},
		Args:        []string{"true"},
		Env:         []string{"PATH=/bin"},
		Cwd:         "/",
		Capabilities: &specs.LinuxCapabilities{
			Bounding: caps, Effective: caps, Inheritable: caps, Permitted: caps, Ambient: caps,
		},
		Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
		NoNewPrivileges: true,
		OOMScoreAdj:     func() *int { v := 0; return &v }(),
	}
	dev := specs.LinuxDevice{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229, UID: u32(0), GID: u32(0)}
	return &helperConfig{
		Init:    true,
		Rootfs:  "/run/macvm/c/sample/rootfs",
		Process: proc,
		Spec: &specs.Spec{
			Version:     specs.Version,
			Process:     proc,
			Root:        &specs.Root{Path: "rootfs", Readonly: true},
			Hostname:    "sample",
			Domainname:  "sample",
			Mounts:      []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid"}}},
			Hooks:       &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true", Args: []string{"true"}, Env: []string{"A=1"}}}},
			Annotations: map[string]string{"io.kubernetes.cri.container-type": "sandbox"},
			Linux: &specs.Linux{
				Sysctl: map[string]string{"net.ipv4.ip_forward": "1"},
				Resources: &specs.LinuxResources{
					Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"},
						{Allow: true, Type: "c", Major: i64(1), Minor: i64(3), Access: "rwm"}},
					Memory:         &specs.LinuxMemory{Limit: i64(1 << 30), Swap: i64(1 << 30)},
					CPU:            &specs.LinuxCPU{Shares: u64(1024), Quota: i64(100000), Period: u64(100000), Cpus: "0"},
					Pids:           &specs.LinuxPids{Limit: i64(100)},
					HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 0}},
					Unified:        map[string]string{"memory.high": "max"},
				},
				CgroupsPath:       "/sample",
				Namespaces:        []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace, Path: "/proc/1/ns/net"}},
				Devices:           []specs.LinuxDevice{dev},
				RootfsPropagation: "rslave",
				MaskedPaths:       []string{"/proc/kcore"},
				ReadonlyPaths:     []string{"/proc/sys"},
				Seccomp: &specs.LinuxSeccomp{
					DefaultAction: specs.ActErrno,
					Architectures: []specs.Arch{specs.ArchX86_64},
					Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow,
						Args: []specs.LinuxSeccompArg{{Index: 0, Value: 1, Op: specs.OpEqualTo}}}},
				},
			},
		},
		NewCgroupNS: true,
		StdioFds:    []int{1, 2},
		Trace:       true,
		TraceFrom:   1,
	}
}
