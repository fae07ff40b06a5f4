package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Templates lists the keys of the complete warm-start templates in TemplateDir: directories with a
// manifest, which the shim writes last. Builds in progress (".build-*") and the pool's directory
// are not templates.
func (c *Containerd) Templates() []string {
	var keys []string
	ents, _ := os.ReadDir(c.TemplateDir)
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") || e.Name() == "pool" {
			continue
		}
		if _, err := os.Stat(filepath.Join(c.TemplateDir, e.Name(), "manifest.json")); err == nil {
			keys = append(keys, e.Name())
		}
	}
	return keys
}

// WaitTemplates polls Templates until done accepts the keys and returns them; templates are built
// in the background, by a detached builder. After timeout it fails t with the builder's log.
func (c *Containerd) WaitTemplates(t testing.TB, timeout time.Duration, done func(keys []string) bool) []string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		keys := c.Templates()
		if done(keys) {
			return keys
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(c.TemplateDir, "build.log"))
			t.Fatalf("templates %q after %v, not the ones waited for; build log:\n%s", keys, timeout, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
