package service

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestRunHooks(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "state.json")
	state := specs.State{Version: specs.Version, ID: "c1", Status: specs.StateCreating, Pid: 42, Bundle: "/b"}
	hooks := []specs.Hook{
		{Path: "/bin/sh", Args: []string{"sh", "-c", `cat > "$OUT"`}, Env: []string{"OUT=" + out}},
		{Path: "/bin/sh", Args: []string{"sh", "-c", `echo second >> "$OUT.order"`}, Env: []string{"OUT=" + out}},
	}
	if err := runHooks(context.Background(), "createRuntime", hooks, state); err != nil {
		t.Fatal(err)
	}
	var got specs.State
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &got); err != nil || got.ID != "c1" || got.Pid != 42 || got.Status != specs.StateCreating {
		t.Errorf("the hook got %s (%v)", data, err)
	}
	if _, err := os.Stat(out + ".order"); err != nil {
		t.Errorf("the second hook did not run: %v", err)
	}

	err = runHooks(context.Background(), "poststop", []specs.Hook{
		{Path: "/bin/sh", Args: []string{"sh", "-c", "echo broken >&2; exit 3"}},
		{Path: "/bin/sh", Args: []string{"sh", "-c", "touch " + out + ".never"}},
	}, state)
	if err == nil || !strings.Contains(err.Error(), "poststop hook /bin/sh") || !strings.Contains(err.Error(), "broken") {
		t.Errorf("failing hook: %v", err)
	}
	if _, err := os.Stat(out + ".never"); err == nil {
		t.Error("a hook ran after a failed one")
	}

	one := 1
	start := time.Now()
	err = runHooks(context.Background(), "createRuntime", []specs.Hook{{Path: "/bin/sleep", Args: []string{"sleep", "30"}, Timeout: &one}}, state)
	if err == nil || time.Since(start) > 10*time.Second {
		t.Errorf("hook timeout: %v after %v", err, time.Since(start))
	}
}
