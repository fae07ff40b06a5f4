package vm

import (
	"encoding/json"
	"os"
	"path/filepath"
)

// Refused restores under Virtualization.framework. A template that passes
// validation (its manifest and state file are as saved) and still fails to
// restore was most likely refused by the framework itself: a configuration
// it restores differently than documented (another socket or image behind
// a device, say), or a macOS update that changed the save format. Each
// failure removes the template and asks for a rebuild, which boots a whole
// VM; a refusal that is systematic would repeat that for every container.
// So failures are counted per key and system version, and after
// vzMaxRestoreFailures VMs of that configuration boot cold without asking
// for a template, with a log line, until the system changes or the record
// (<template_dir>/<key>.refused) is removed.

// vzMaxRestoreFailures is how many failed restores of one key (each
// followed by a rebuild) are tried before the key is left alone.
const vzMaxRestoreFailures = 2

// vzSystemVersion names the host system for refusal records (macOS
// version and build); nil, as off darwin/arm64, names none.
var vzSystemVersion func() string

func vzSystem() string {
	if vzSystemVersion == nil {
		return ""
	}
	return vzSystemVersion()
}

// vzRefusal is the record of a key's failed restores.
type vzRefusal struct {
	System   string `json:"system"`
	Failures int    `json:"failures"`
	// Error is the last failure, for the log and for humans.
	Error string `json:"error"`
}

func (tc *TemplateCache) refusalPath(key string) string {
	return filepath.Join(tc.Dir, key+".refused")
}

// vzRefusals returns key's record on this system (zero if none, or if it
// was made on another system version: the framework may restore now).
func (tc *TemplateCache) vzRefusals(key string) vzRefusal {
	b, err := os.ReadFile(tc.refusalPath(key))
	if err != nil {
		return vzRefusal{}
	}
	var r vzRefusal
	if json.Unmarshal(b, &r) != nil || r.System != vzSystem() {
		return vzRefusal{}
	}
	return r
}

// recordVZRefusal counts one more failed restore of key and returns the
// record. Shims racing here may lose a count, which only delays the
// give-up by a rebuild; the record is replaced by rename, never torn.
func (tc *TemplateCache) recordVZRefusal(key string, failure error) vzRefusal {
	r := tc.vzRefusals(key)
	r.System, r.Failures, r.Error = vzSystem(), r.Failures+1, failure.Error()
	b, err := json.Marshal(&r)
	if err != nil {
		return r
	}
	tmp, err := os.CreateTemp(tc.Dir, ".refused-"+key+"-")
	if err != nil {
		tc.logf("warm start: recording the refused restore of template %s: %v", key, err)
		return r
	}
	_, werr := tmp.Write(b)
	cerr := tmp.Close()
	if werr != nil || cerr != nil || os.Rename(tmp.Name(), tc.refusalPath(key)) != nil {
		os.Remove(tmp.Name())
		tc.logf("warm start: recording the refused restore of template %s failed", key)
	}
	return r
}

// clearVZRefusals forgets key's failed restores after one succeeded.
func (tc *TemplateCache) clearVZRefusals(key string) { os.Remove(tc.refusalPath(key)) }
