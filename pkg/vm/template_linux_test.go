package vm

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// templateTestConfig is a config with stand-in boot files: keys and
// validation need no VM.
func templateTestConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"vmlinux", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return Config{
		ID: "a", StateDir: t.TempDir(), Kernel: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initrd.img"),
		CPUs: 1, MemoryMiB: 256, Shares: []Share{{Tag: "shared", HostPath: t.TempDir()}},
	}
}

func templateKey(t *testing.T, cfg Config) string {
	t.Helper()
	q, err := NewQEMU(cfg)
	if err != nil {
		t.Fatal(err)
	}
	in, err := q.templateInputs()
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := in.key()
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// The key ignores what differs between containers of one configuration
// and changes with everything a clone must match.
func TestTemplateKey(t *testing.T) {
	cfg := templateTestConfig(t)
	key := templateKey(t, cfg)

	other := cfg
	other.ID, other.StateDir = "b", t.TempDir()
	other.Shares = []Share{{Tag: "shared", HostPath: t.TempDir()}}
	if k := templateKey(t, other); k != key {
		t.Errorf("another container's id, state dir and share path changed the key")
	}

	for name, change := range map[string]func(c *Config){
		"memory":      func(c *Config) { c.MemoryMiB = 512 },
		"cpus":        func(c *Config) { c.CPUs = 2 },
		"kernel args": func(c *Config) { c.KernelArgs = []string{"quiet"} },
		"share tag":   func(c *Config) { c.Shares = []Share{{Tag: "other", HostPath: c.Shares[0].HostPath}} },
		"share ro":    func(c *Config) { c.Shares = []Share{{Tag: "shared", HostPath: c.Shares[0].HostPath, ReadOnly: true}} },
		"two shares": func(c *Config) {
			c.Shares = append([]Share{}, c.Shares[0], Share{Tag: "x", HostPath: c.Shares[0].HostPath})
		},
	} {
		c := cfg
		change(&c)
		if k := templateKey(t, c); k == key {
			t.Errorf("changing the %s kept the key", name)
		}
	}

	for _, f := range []string{cfg.Kernel, cfg.Initrd} {
		// A rebuilt boot file: same path, new content and mtime.
		later := time.Now().Add(time.Hour)
		if err := os.WriteFile(f, []byte("rebuilt"), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Chtimes(f, later, later)
		if k := templateKey(t, cfg); k == key {
			t.Errorf("rewriting %s kept the key", filepath.Base(f))
		}
		key = templateKey(t, cfg)
	}

}

// Disks are in the key by number, order and read-only flag; their image
// files (a container's) are not.
func TestTemplateKeyDisks(t *testing.T) {
	cfg := templateTestConfig(t)
	withDisks := func(disks ...Disk) Config {
		c := cfg
		c.Disks = disks
		return c
	}
	none := templateKey(t, cfg)
	two := templateKey(t, withDisks(Disk{Path: "/a/rw.img"}, Disk{Path: "/a/layer.erofs", ReadOnly: true}))
	if two == none {
		t.Errorf("disks did not change the key")
	}
	if k := templateKey(t, withDisks(Disk{Path: "/b/rw.img"}, Disk{Path: "/b/layer.erofs", ReadOnly: true})); k != two {
		t.Errorf("another container's image files changed the key")
	}
	for name, c := range map[string]Config{
		"read-only flag": withDisks(Disk{Path: "/a/rw.img"}, Disk{Path: "/a/layer.erofs"}),
		"order":          withDisks(Disk{Path: "/a/layer.erofs", ReadOnly: true}, Disk{Path: "/a/rw.img"}),
		"count":          withDisks(Disk{Path: "/a/rw.img"}, Disk{Path: "/a/l1", ReadOnly: true}, Disk{Path: "/a/l2", ReadOnly: true}),
	} {
		if k := templateKey(t, c); k == two {
			t.Errorf("changing the disks' %s kept the key", name)
		}
	}
}

// NICs are in the key by number, order and kind; their backends and MACs
// (a container's) are not.
func TestTemplateKeyNICs(t *testing.T) {
	cfg := templateTestConfig(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	g, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mac := func(s string) net.HardwareAddr {
		hw, err := net.ParseMAC(s)
		if err != nil {
			t.Fatal(err)
		}
		return hw
	}
	withNICs := func(nics ...NIC) Config {
		c := cfg
		c.NICs = nics
		return c
	}
	none := templateKey(t, cfg)
	tap := templateKey(t, withNICs(NIC{Kind: NICTap, File: f, MAC: mac("0a:58:0a:63:00:05")}))
	if tap == none {
		t.Errorf("a NIC did not change the key")
	}
	if k := templateKey(t, withNICs(NIC{Kind: NICTap, File: g, MAC: mac("0a:58:0a:63:00:06")})); k != tap {
		t.Errorf("another container's tap and MAC changed the key")
	}
	if k := templateKey(t, withNICs(NIC{Kind: NICTap, File: g})); k != tap {
		t.Errorf("a NIC without a MAC changed the key")
	}
	dgram := templateKey(t, withNICs(NIC{Kind: NICDatagram, File: f, MAC: mac("5a:94:ef:e4:0c:ee")}))
	if dgram == tap || dgram == none {
		t.Errorf("a datagram NIC has the key of a tap or of none")
	}
	two := templateKey(t, withNICs(NIC{Kind: NICTap, File: f}, NIC{Kind: NICDatagram, File: g}))
	swapped := templateKey(t, withNICs(NIC{Kind: NICDatagram, File: f}, NIC{Kind: NICTap, File: g}))
	if two == tap || two == swapped {
		t.Errorf("the number or order of NICs kept the key")
	}
}

func TestStandInNICs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("stand-in taps need root (a network namespace and /dev/net/tun)")
	}
	nics, release, err := standInNICs([]NIC{{Kind: NICDatagram}, {Kind: NICTap}, {Kind: NICTap}})
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if len(nics) != 3 {
		t.Fatalf("%d stand-ins for 3 NICs", len(nics))
	}
	for i, n := range nics {
		if want := []NICKind{NICDatagram, NICTap, NICTap}[i]; n.Kind != want || n.File == nil {
			t.Errorf("stand-in %d: kind %s file %v, want a %s with a file", i, n.Kind, n.File, want)
		}
		if n.MAC.String() != TemplateMAC(i).String() {
			t.Errorf("stand-in %d: MAC %s, want %s", i, n.MAC, TemplateMAC(i))
		}
	}
	// A tap stand-in is opened like the pod network's: no packet
	// information, virtio-net headers (QEMU offers offloads over those).
	for _, n := range nics[1:] {
		ifr, err := unix.NewIfreq("")
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.IoctlIfreq(int(n.File.Fd()), unix.TUNGETIFF, ifr); err != nil {
			t.Fatalf("TUNGETIFF: %v", err)
		}
		if flags, want := ifr.Uint16(), uint16(unix.IFF_TAP|unix.IFF_NO_PI|unix.IFF_VNET_HDR); flags&want != want {
			t.Errorf("tap flags %#x, want %#x set", flags, want)
		}
	}
	// The taps are not in our namespace.
	if ifs, _ := net.Interfaces(); len(ifs) > 0 {
		for _, i := range ifs {
			if strings.HasPrefix(i.Name, "tmpl") {
				t.Errorf("stand-in tap %s is in the test's own namespace", i.Name)
			}
		}
	}
}

// fakeTemplate writes a template's files as Build does, without a VM.
func fakeTemplate(t *testing.T, tc *TemplateCache, cfg Config) string {
	t.Helper()
	q, err := NewQEMU(cfg)
	if err != nil {
		t.Fatal(err)
	}
	in, err := q.templateInputs()
	if err != nil {
		t.Fatal(err)
	}
	key, ids, err := in.key()
	if err != nil {
		t.Fatal(err)
	}
	dir := tc.dir(key)
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, templateMemory), make([]byte, 4096), 0o600)
	os.WriteFile(filepath.Join(dir, templateState), []byte("QEVM device state"), 0o600)
	if err := writeManifest(dir, key, in, ids, true); err != nil {
		t.Fatal(err)
	}
	return key
}

func TestTemplateValidation(t *testing.T) {
	cfg := templateTestConfig(t)
	tc := &TemplateCache{Dir: t.TempDir()}
	if _, err := tc.Lookup(cfg); !errdefs.IsNotFound(err) {
		t.Fatalf("lookup in an empty cache: %v, want not found", err)
	}
	key := fakeTemplate(t, tc, cfg)
	if k, err := tc.Lookup(cfg); err != nil || k != key {
		t.Fatalf("lookup of a complete template: %q %v", k, err)
	}

	damage := map[string]func(dir string){
		"state flipped": func(dir string) {
			p := filepath.Join(dir, templateState)
			b, _ := os.ReadFile(p)
			b[0] ^= 0xff
			os.WriteFile(p, b, 0o600)
		},
		"memory truncated": func(dir string) { os.Truncate(filepath.Join(dir, templateMemory), 100) },
		"memory written": func(dir string) {
			later := time.Now().Add(time.Hour)
			os.Chtimes(filepath.Join(dir, templateMemory), later, later)
		},
		"no manifest":      func(dir string) { os.Remove(filepath.Join(dir, templateManifest)) },
		"garbled manifest": func(dir string) { os.WriteFile(filepath.Join(dir, templateManifest), []byte("{"), 0o600) },
		"no state":         func(dir string) { os.Remove(filepath.Join(dir, templateState)) },
	}
	for name, f := range damage {
		t.Run(name, func(t *testing.T) {
			tc := &TemplateCache{Dir: t.TempDir()}
			key := fakeTemplate(t, tc, cfg)
			f(tc.dir(key))
			_, err := tc.Lookup(cfg)
			if err == nil {
				t.Fatal("damaged template accepted")
			}
			if name == "no manifest" {
				// A template without its manifest is one being built.
				if !errdefs.IsNotFound(err) {
					t.Fatalf("got %v, want not found", err)
				}
				return
			}
			if !errdefs.IsDataLoss(err) {
				t.Fatalf("got %v, want data loss", err)
			}
		})
	}

	// A new initrd: the old template is never used, and prune removes it.
	later := time.Now().Add(time.Hour)
	os.WriteFile(cfg.Initrd, []byte("new initrd"), 0o644)
	os.Chtimes(cfg.Initrd, later, later)
	if _, err := tc.Lookup(cfg); !errdefs.IsNotFound(err) {
		t.Fatalf("lookup after the initrd changed: %v, want not found", err)
	}
	newKey := fakeTemplate(t, tc, cfg)
	tc.prune(newKey)
	if _, err := os.Stat(tc.dir(key)); !os.IsNotExist(err) {
		t.Errorf("stale template %s not pruned: %v", key, err)
	}
	if _, err := tc.Lookup(cfg); err != nil {
		t.Errorf("new template: %v", err)
	}
}

// Build refuses to run while another process holds the key's lock.
func TestTemplateBuildLocked(t *testing.T) {
	cfg := templateTestConfig(t)
	tc := &TemplateCache{Dir: t.TempDir()}
	key := templateKey(t, cfg)
	f, err := os.OpenFile(tc.lockPath(key), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := flockNB(f); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := tc.Build(ctx, cfg); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("build while locked: %v, want already exists", err)
	}
	// While it is being built, a miss asks for no other builder.
	misses := 0
	tc.OnMiss = func(Config) { misses++ }
	tc.miss(key, cfg)
	if misses != 0 || !tc.building(key) {
		t.Errorf("miss during a build: %d builder requests (building %v), want none", misses, tc.building(key))
	}
	f.Close()
	tc.miss(key, cfg)
	if misses != 1 || tc.building(key) {
		t.Errorf("miss after the build: %d builder requests (building %v), want 1", misses, tc.building(key))
	}
}

// A template's RAM is a shared file; a clone maps it privately and waits
// for its state instead of booting, with a smaller TCG translation cache
// (it holds no boot code).
func TestTemplateArgs(t *testing.T) {
	cfg := templateTestConfig(t)
	for _, tt := range []struct {
		shared, incoming bool
		want             []string
	}{
		{true, false, []string{"memory-backend-file,id=mem,size=256M,mem-path=/t/mem,,x,share=on", "microvm,x-option-roms=off,pit=off,pic=off,memory-backend=mem", "-accel tcg,tb-size=128"}},
		{false, true, []string{"memory-backend-file,id=mem,size=256M,mem-path=/t/mem,,x,share=off", "-incoming defer", "-accel tcg,tb-size=64"}},
	} {
		args, err := qemuArgs(cfg, qemuOptions{Arch: "amd64", MemPath: "/t/mem,x", MemShared: tt.shared, Incoming: tt.incoming, QMPFD: 3, AgentFD: 4})
		if err != nil {
			t.Fatal(err)
		}
		joined := " " + strings.Join(args, " ") + " "
		for _, w := range tt.want {
			if !strings.Contains(joined, " "+w+" ") {
				t.Errorf("args %q lack %q", joined, w)
			}
		}
		if !tt.incoming && strings.Contains(joined, "-incoming") {
			t.Errorf("template args %q wait for a migration", joined)
		}
	}
}

// The cache keeps the MaxTemplates most recently used templates.
func TestTemplatePruneLRU(t *testing.T) {
	cfg := templateTestConfig(t)
	tc := &TemplateCache{Dir: t.TempDir()}
	var keys []string
	base := time.Now().Add(-time.Hour)
	for i := 0; i < MaxTemplates+2; i++ {
		c := cfg
		c.MemoryMiB = 256 + i
		key := fakeTemplate(t, tc, c)
		used := base.Add(time.Duration(i) * time.Minute)
		os.Chtimes(tc.dir(key), used, used)
		keys = append(keys, key)
	}
	tc.touch(keys[0]) // the oldest, used just now
	tc.prune(keys[len(keys)-1])
	for i, key := range keys {
		_, err := os.Stat(tc.dir(key))
		gone := os.IsNotExist(err)
		// Kept: the one just built, keys[0] (touched), and the newest others.
		wantGone := i == 1 || i == 2
		if gone != wantGone {
			t.Errorf("template %d (of %d): removed %v, want %v", i, len(keys), gone, wantGone)
		}
	}
}
