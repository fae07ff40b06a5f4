package containerd_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// templateWait bounds a background template build (a cold boot and a
// save) on a loaded TCG machine.
const templateWait = 5 * time.Minute

// TestWarmStart runs containers with warm_start = "template" on boot
// files of its own: the first `ctr run` boots cold and a detached builder
// saves a template; the next one (with a bind mount the first did not
// have) starts from it. A corrupted template
// falls back to a cold boot and is rebuilt; a changed initrd is never
// cloned from (cold boot, new template, old one removed).
func TestWarmStart(t *testing.T) {
	rt := harness.Macvm()
	boot := t.TempDir()
	if err := os.Symlink(filepath.Join(suite.Paths.BootDir, "vmlinux"), filepath.Join(boot, "vmlinux")); err != nil {
		t.Fatal(err)
	}
	initrd, err := os.ReadFile(filepath.Join(suite.Paths.BootDir, "initrd.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(boot, "initrd.img"), initrd, 0o644); err != nil {
		t.Fatal(err)
	}
	d := daemonWith(t, rt, harness.Options{Paths: harness.Paths{BinDir: suite.Paths.BinDir, BootDir: boot}, WarmStart: "template"})

	runMode := func(id string) string {
		t.Helper()
		res := run(t, d, rt, nil, nil, id, "sh", "-c", "cat /etc/hostname >/dev/null; echo ok-"+id)
		if res.ExitCode != 0 || strings.TrimSpace(string(res.Stdout)) != "ok-"+id {
			t.Fatalf("ctr run %s: %v", id, res)
		}
		return startMode(t, d, id)
	}

	if mode := runMode("warm1"); mode != "cold" {
		t.Fatalf("first container: start_mode=%s, want cold (no template yet)", mode)
	}
	first := waitTemplate(t, d, "")
	// Another container, with a bind mount of its own, from the same
	// template: nothing container-specific is in a template.
	vol := t.TempDir()
	if err := os.WriteFile(filepath.Join(vol, "f"), []byte("volume-of-warm2"), 0o644); err != nil {
		t.Fatal(err)
	}
	res := run(t, d, rt, nil, []string{"--mount", "type=bind,src=" + vol + ",dst=/data,options=rbind:ro"}, "warm2", "cat", "/data/f")
	if res.ExitCode != 0 || string(res.Stdout) != "volume-of-warm2" {
		t.Fatalf("ctr run warm2 with a bind mount: %v", res)
	}
	if mode := startMode(t, d, "warm2"); mode != "template" {
		t.Fatalf("second container: start_mode=%s, want template", mode)
	}

	// Corrupt the device state: detected, cold boot, rebuilt.
	state := filepath.Join(d.TemplateDir, first, "state")
	b, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(state, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if mode := runMode("warm3"); mode != "cold" {
		t.Fatalf("container after corrupting the template: start_mode=%s, want cold", mode)
	}
	if rebuilt := waitTemplate(t, d, ""); rebuilt != first {
		t.Fatalf("rebuilt template %s, want the same key %s", rebuilt, first)
	}
	if mode := runMode("warm4"); mode != "template" {
		t.Fatalf("container after the rebuild: start_mode=%s, want template", mode)
	}

	// A new initrd (same content, new file): cold, then a new template.
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(filepath.Join(boot, "initrd.img"), later, later); err != nil {
		t.Fatal(err)
	}
	if mode := runMode("warm5"); mode != "cold" {
		t.Fatalf("container after changing the initrd: start_mode=%s, want cold", mode)
	}
	second := waitTemplate(t, d, first)
	if second == first {
		t.Fatalf("template key %s did not change with the initrd", first)
	}
	if _, err := os.Stat(filepath.Join(d.TemplateDir, first)); !os.IsNotExist(err) {
		t.Errorf("the template of the old initrd was not removed: %v", err)
	}
	// Let the builder exit before the harness looks for leftovers.
	if l, err := d.WaitClean(time.Minute, true); err != nil || len(l.Procs) > 0 {
		t.Errorf("processes left after the builds: %v %s", err, l)
	}
}

var startModeRE = regexp.MustCompile(`start_mode=(\w+)`)

// startMode finds the shim's "VM ready" line of container id in
// containerd's log.
func startMode(t *testing.T, d *harness.Containerd, id string) string {
	t.Helper()
	b, err := os.ReadFile(d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	idRE := regexp.MustCompile(`container_id=` + regexp.QuoteMeta(id) + `(\s|$)`)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "VM ready") && idRE.MatchString(l) {
			if m := startModeRE.FindStringSubmatch(l); m != nil {
				t.Logf("%s: %s", id, l)
				return m[1]
			}
		}
	}
	t.Fatalf("no start_mode line for %s in containerd's log:\n%s", id, d.LogTail(4000))
	return ""
}

// waitTemplate waits for a complete template (one with a manifest) other
// than not, and returns its key.
func waitTemplate(t *testing.T, d *harness.Containerd, not string) string {
	t.Helper()
	other := func(keys []string) string {
		for _, k := range keys {
			if k != not {
				return k
			}
		}
		return ""
	}
	return other(d.WaitTemplates(t, templateWait, func(keys []string) bool { return other(keys) != "" }))
}
