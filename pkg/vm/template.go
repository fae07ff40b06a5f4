package vm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// StartMode says how a Machine came up: a cold boot, a clone of a saved
// template, or a process started ahead from a pool.
type StartMode string

const (
	StartCold     StartMode = "cold"
	StartTemplate StartMode = "template"
	StartPool     StartMode = "pool"
)

// StartModer is implemented by machines that can start other than cold.
type StartModer interface {
	// StartMode is how the machine started; meaningful after Start.
	StartMode() StartMode
}

// StartModeOf reports m's start mode; a machine that does not say booted
// cold.
func StartModeOf(m Machine) StartMode {
	if s, ok := m.(StartModer); ok {
		return s.StartMode()
	}
	return StartCold
}

// TemplateCache is a directory of saved VM templates (warm start). A
// template is a VM booted once up to a ready agent and then saved: its RAM
// in a file (memory) and its device state as a migration stream (state).
// Clones map the memory privately and load the state, which skips the
// kernel boot. Templates are keyed by a hash of everything that makes a
// clone incompatible with its template (see templateKey), so a template
// whose inputs changed is never used: its key is simply never asked for.
//
// The zero value is not usable; Dir must be set. A TemplateCache is safe
// for concurrent use, also by several processes: building is serialised
// by a lock file per key and the finished template appears by rename.
type TemplateCache struct {
	// Dir holds one directory per template key plus its lock file.
	Dir string
	// Ready is called with a template VM's agent channel once the guest
	// opened it; when it returns the VM is saved. It should wait until
	// the guest is quiescent (the agent answers, modules are loaded) and
	// may return a release func, called after the save, for whatever it
	// opened on conn. nil: saved as soon as the channel is open.
	Ready func(ctx context.Context, conn net.Conn) (release func(), err error)
	// OnMiss is called (from Start, so it must not block) when cfg has
	// no usable template. The shim starts a detached builder; nil builds
	// in a goroutine of this process.
	OnMiss func(cfg Config)
	// Logf reports fallbacks and rebuilds; nil is silent.
	Logf func(format string, args ...any)
	// Pool, when set, is asked first for a VM started ahead of the same
	// template (QEMU only); without one a clone is started here.
	Pool *PoolClient
}

func (tc *TemplateCache) logf(format string, args ...any) {
	if tc.Logf != nil {
		tc.Logf(format, args...)
	}
}

// Files of a template directory.
const (
	templateManifest = "manifest.json"
	templateMemory   = "memory"
	templateState    = "state"
	// templateFormat changes whenever the layout or the way templates are
	// made changes, so old ones are never used by a new shim.
	templateFormat = 1
)

// fileID identifies a file's content cheaply: a replaced or rewritten
// file has a different inode, size or mtime. Hashing a 60 MB kernel on
// every container start would cost more than the warm start saves.
type fileID struct {
	Path    string `json:"path"`
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Size    int64  `json:"size"`
	MtimeNs int64  `json:"mtime_ns"`
}

func statID(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, fmt.Errorf("template input %s: %w", path, err)
	}
	id := fileID{Path: path, Size: fi.Size(), MtimeNs: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.Dev, id.Ino = uint64(st.Dev), uint64(st.Ino)
	}
	return id, nil
}

// manifest describes a finished template; it is written last, so a
// template without one (or with one that does not match its files) is
// partial or damaged and is rebuilt.
type manifest struct {
	Format int    `json:"format"`
	Key    string `json:"key"`
	// Args is the canonical command line the key hashes (for humans).
	Args   []string `json:"args"`
	Inputs []fileID `json:"inputs"`
	// Memory is the identity of the RAM file when the save finished;
	// it is too big to hash per clone, but any write changes its mtime.
	Memory fileID `json:"memory,omitzero"`
	// The state file is checked by its checksum when it is small
	// (QEMU: device state only), else by its identity (State).
	State       fileID `json:"state,omitzero"`
	StateBytes  int64  `json:"state_bytes"`
	StateSHA256 string `json:"state_sha256,omitempty"`
}

// templateInputs are the canonical description of a template: the
// hypervisor command line with per-VM paths replaced by placeholders,
// and the files it runs.
type templateInputs struct {
	args  []string
	files []string
}

// templateShares, templateDisks and templateNICs are a VM's devices as
// its template key sees them, shared by every backend: per-VM paths become
// fixed placeholders and backends and MACs go, so two VMs of one device
// layout get one key whatever their containers. Shares keep their tags
// and flags; disks count by number, order and read-only flag (the template
// is booted with stand-in images, and the agent re-probes a disk it sees
// with a stand-in's capacity); NICs by number, order and kind (a tap and a
// datagram socket negotiate different virtio-net features), not by MAC:
// the template's NICs have TemplateMAC and the agent sets a clone's own.
func templateShares(shares []Share) []Share {
	out := make([]Share, len(shares))
	for i, s := range shares {
		s.HostPath = "share" + strconv.Itoa(i)
		out[i] = s
	}
	return out
}

func templateDisks(disks []Disk) []Disk {
	out := make([]Disk, len(disks))
	for i, d := range disks {
		out[i] = Disk{Path: "disk" + strconv.Itoa(i), ReadOnly: d.ReadOnly}
	}
	return out
}

func templateNICs(nics []NIC) []NIC {
	out := make([]NIC, len(nics))
	for i, n := range nics {
		out[i] = NIC{Kind: n.Kind}
	}
	return out
}

// key hashes the inputs and the identity of their files.
func (in templateInputs) key() (string, []fileID, error) {
	h := sha256.New()
	fmt.Fprintf(h, "macvm-template-%d\n", templateFormat)
	for _, a := range in.args {
		fmt.Fprintf(h, "arg %q\n", a)
	}
	var ids []fileID
	for _, f := range in.files {
		id, err := statID(f)
		if err != nil {
			return "", nil, err
		}
		ids = append(ids, id)
		fmt.Fprintf(h, "file %q %d %d %d %d\n", id.Path, id.Dev, id.Ino, id.Size, id.MtimeNs)
	}
	return hex.EncodeToString(h.Sum(nil))[:32], ids, nil
}

func (tc *TemplateCache) dir(key string) string      { return filepath.Join(tc.Dir, key) }
func (tc *TemplateCache) lockPath(key string) string { return filepath.Join(tc.Dir, key+".lock") }

// validate checks the template of key: the manifest matches the key and
// format, the state file its checksum, the memory file its identity.
func (tc *TemplateCache) validate(key string) (*manifest, error) {
	dir := tc.dir(key)
	b, err := os.ReadFile(filepath.Join(dir, templateManifest))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("template %s: %w", key, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("template %s: %w", key, err)
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("template %s: manifest: %v: %w", key, err, errdefs.ErrDataLoss)
	}
	if m.Format != templateFormat || m.Key != key {
		return nil, fmt.Errorf("template %s: manifest is for format %d key %s: %w", key, m.Format, m.Key, errdefs.ErrDataLoss)
	}
	if m.Memory.Path != "" {
		mem, err := statID(filepath.Join(dir, templateMemory))
		if err != nil {
			return nil, fmt.Errorf("template %s: %v: %w", key, err, errdefs.ErrDataLoss)
		}
		mem.Path = m.Memory.Path
		if mem != m.Memory {
			return nil, fmt.Errorf("template %s: memory file changed since it was saved (size %d, want %d): %w",
				key, mem.Size, m.Memory.Size, errdefs.ErrDataLoss)
		}
	}
	if m.StateSHA256 == "" {
		st, err := statID(filepath.Join(dir, templateState))
		if err != nil {
			return nil, fmt.Errorf("template %s: %v: %w", key, err, errdefs.ErrDataLoss)
		}
		st.Path = m.State.Path
		if m.State.Path == "" || st != m.State {
			return nil, fmt.Errorf("template %s: state file changed since it was saved (size %d, want %d): %w",
				key, st.Size, m.State.Size, errdefs.ErrDataLoss)
		}
		return &m, nil
	}
	state, err := os.ReadFile(filepath.Join(dir, templateState))
	if err != nil {
		return nil, fmt.Errorf("template %s: %v: %w", key, err, errdefs.ErrDataLoss)
	}
	sum := sha256.Sum256(state)
	if int64(len(state)) != m.StateBytes || hex.EncodeToString(sum[:]) != m.StateSHA256 {
		return nil, fmt.Errorf("template %s: state file does not match its checksum (%d bytes, want %d): %w",
			key, len(state), m.StateBytes, errdefs.ErrDataLoss)
	}
	return &m, nil
}

// discard removes a damaged template. Clones running from it keep their
// open files; the next build writes a new one.
func (tc *TemplateCache) discard(key string) {
	tmp := filepath.Join(tc.Dir, ".discard-"+key)
	os.RemoveAll(tmp)
	if err := os.Rename(tc.dir(key), tmp); err == nil {
		os.RemoveAll(tmp)
	}
}

// prune removes templates whose input files have changed since they were
// saved (a new kernel or initrd at the same path): they can never be used
// again. Templates of other, still valid configurations stay.
func (tc *TemplateCache) prune(keep string) {
	entries, err := os.ReadDir(tc.Dir)
	if err != nil {
		return
	}
	type kept struct {
		key  string
		used time.Time
	}
	var live []kept
	for _, e := range entries {
		if !e.IsDir() || e.Name() == keep || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(tc.Dir, e.Name(), templateManifest))
		if err != nil {
			continue // being built, or not ours
		}
		var m manifest
		if json.Unmarshal(b, &m) != nil {
			continue
		}
		stale := m.Format != templateFormat
		for _, in := range m.Inputs {
			if id, err := statID(in.Path); err != nil || id != in {
				stale = true
			}
		}
		if stale {
			tc.logf("warm start: removing template %s: its inputs changed", e.Name())
			tc.discard(e.Name())
			os.Remove(tc.lockPath(e.Name()))
			continue
		}
		if fi, err := e.Info(); err == nil {
			live = append(live, kept{e.Name(), fi.ModTime()})
		}
	}
	// Bounded: every VM size is a template of its own. The least recently
	// used ones go (a clone start touches its template's directory).
	sort.Slice(live, func(i, j int) bool { return live[i].used.After(live[j].used) })
	for i := MaxTemplates - 1; i < len(live); i++ {
		tc.logf("warm start: removing template %s: least recently used of more than %d", live[i].key, MaxTemplates)
		tc.discard(live[i].key)
	}
}

// MaxTemplates bounds how many templates a cache keeps (each costs its
// touched guest RAM on disk, ~120 MB for a 512 MiB Debian-kernel guest).
const MaxTemplates = 8

// touch marks key's template as just used, for prune's LRU order.
func (tc *TemplateCache) touch(key string) {
	now := time.Now()
	os.Chtimes(tc.dir(key), now, now)
}

// templateBoot boots cfg's template VM (its state directory and shares
// are in dir) up to the TemplateCache's Ready and saves it into dir.
type templateBoot func(ctx context.Context, cfg Config, dir string) error

// build is Build for any backend: under the key's lock, unless a valid
// template exists, boot saves a template into a temporary directory with
// empty stand-ins for the shares, the manifest is written last and the
// directory renamed into place. hashState checksums the state file (small
// under QEMU) instead of recording its identity (a whole-VM save under
// Virtualization.framework, RAM included, too big to hash per lookup).
func (tc *TemplateCache) build(ctx context.Context, cfg Config, in templateInputs, boot templateBoot, hashState bool) error {
	key, ids, err := in.key()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(tc.Dir, 0o700); err != nil {
		return fmt.Errorf("template cache: %w", err)
	}
	lock, err := os.OpenFile(tc.lockPath(key), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("template lock: %w", err)
	}
	defer lock.Close() // releases the flock
	if err := flockNB(lock); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("template %s is being built by another process: %w", key, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("template lock: %w", err)
	}
	if _, err := tc.validate(key); err == nil {
		return nil
	}
	tc.discard(key)

	tmp, err := os.MkdirTemp(tc.Dir, ".build-"+key+"-")
	if err != nil {
		return fmt.Errorf("template cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	tcfg := cfg
	tcfg.ID = "template-" + key[:12]
	tcfg.StateDir = filepath.Join(tmp, "vm")
	tcfg.Templates = nil
	tcfg.Shares = make([]Share, len(cfg.Shares))
	for i, s := range cfg.Shares {
		// Same devices, empty directories: nothing of a container may
		// be in a template, and a mounted 9p share cannot be migrated.
		s.HostPath = filepath.Join(tmp, "share"+strconv.Itoa(i))
		if err := os.MkdirAll(s.HostPath, 0o700); err != nil {
			return err
		}
		tcfg.Shares[i] = s
	}
	tcfg.Disks = make([]Disk, len(cfg.Disks))
	for i, d := range cfg.Disks {
		// Same devices, empty files: the guest sees each with no
		// capacity and reads nothing from it, so nothing of it is cached
		// when a clone's agent re-probes the container's disk there.
		// (The vz backend's boot grows them to StandInDiskBytes.)
		d.Path = filepath.Join(tmp, "disk"+strconv.Itoa(i))
		if err := os.WriteFile(d.Path, nil, 0o600); err != nil {
			return err
		}
		tcfg.Disks[i] = d
	}
	if err := os.MkdirAll(tcfg.StateDir, 0o700); err != nil {
		return err
	}
	if err := boot(ctx, tcfg, tmp); err != nil {
		return err
	}

	if err := writeManifest(tmp, key, in, ids, hashState); err != nil {
		return err
	}
	os.RemoveAll(tcfg.StateDir)
	for _, s := range tcfg.Shares {
		os.Remove(s.HostPath)
	}
	for _, d := range tcfg.Disks {
		os.Remove(d.Path)
	}
	if err := os.Rename(tmp, tc.dir(key)); err != nil {
		return fmt.Errorf("template %s: %w", key, err)
	}
	tc.prune(key)
	tc.logf("warm start: template %s saved", key)
	return nil
}

// flockNB takes f's exclusive lock without waiting (EWOULDBLOCK if held).
func flockNB(f *os.File) error { return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) }

// writeManifest records a finished template's files in dir, last: the
// files are synced first, so a manifest never describes data that a crash
// could still lose.
func writeManifest(dir, key string, in templateInputs, ids []fileID, hashState bool) error {
	m := manifest{Format: templateFormat, Key: key, Args: in.args, Inputs: ids}
	memPath, statePath := filepath.Join(dir, templateMemory), filepath.Join(dir, templateState)
	if _, err := os.Stat(memPath); err == nil {
		if err := fsyncPath(memPath); err != nil {
			return err
		}
		// Guest RAM (QEMU creates the file 0644) is for the shim's eyes only.
		if err := os.Chmod(memPath, 0o600); err != nil {
			return err
		}
		if m.Memory, err = statID(memPath); err != nil {
			return err
		}
		m.Memory.Path = templateMemory
	}
	if err := fsyncPath(statePath); err != nil {
		return err
	}
	if hashState {
		state, err := os.ReadFile(statePath)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(state)
		m.StateBytes, m.StateSHA256 = int64(len(state)), hex.EncodeToString(sum[:])
	} else {
		id, err := statID(statePath)
		if err != nil {
			return err
		}
		id.Path = templateState
		m.State, m.StateBytes = id, id.Size
	}
	b, err := json.MarshalIndent(&m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, templateManifest), b, 0o600); err != nil {
		return err
	}
	return fsyncPath(filepath.Join(dir, templateManifest))
}

func fsyncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// miss asks for cfg's template to be built.
func (tc *TemplateCache) miss(key string, cfg Config) {
	if tc.building(key) {
		return // the builder that holds the lock will finish it
	}
	if tc.OnMiss != nil {
		tc.OnMiss(cfg)
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := tc.Build(ctx, cfg); err != nil && !errdefs.IsAlreadyExists(err) {
			tc.logf("warm start: building template for vm %s: %v", cfg.ID, err)
		}
	}()
}

// building reports whether some process holds key's build lock now.
func (tc *TemplateCache) building(key string) bool {
	f, err := os.Open(tc.lockPath(key))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := flockNB(f); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

// TemplateMAC is the MAC of the NIC at index in a warm-start template, and
// so in every clone until the agent sets the container's own: a fixed,
// locally administered address (02:6d:76:74 is "mvt"), the same in every
// template, so nothing of a container is in one and a clone's NICs can be
// found by it.
func TemplateMAC(index int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0x6d, 0x76, 0x74, byte(index >> 8), byte(index)}
}
