package service

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// defaultHookTimeout bounds a hook that sets no timeout of its own: a hook
// that never returns would otherwise hang Create or Delete forever.
const defaultHookTimeout = 2 * time.Minute

// runHooks runs OCI hooks on the host, in order, each with the container's
// state JSON on stdin, as runc does. With a VM in between, only the hooks
// whose job is on the host make sense here (createRuntime, createContainer
// and the legacy prestart while creating; poststart; poststop): nerdctl's
// network and name-registry hooks are of that kind. The first failure stops
// the sequence.
func runHooks(ctx context.Context, kind string, hooks []specs.Hook, state specs.State) error {
	if len(hooks) == 0 {
		return nil
	}
	stdin, err := json.Marshal(state)
	if err != nil {
		return err
	}
	for _, h := range hooks {
		timeout := defaultHookTimeout
		if h.Timeout != nil && *h.Timeout > 0 {
			timeout = time.Duration(*h.Timeout) * time.Second
		}
		hctx, cancel := context.WithTimeout(ctx, timeout)
		cmd := exec.CommandContext(hctx, h.Path)
		if len(h.Args) > 0 {
			cmd.Args = h.Args
		}
		cmd.Env = h.Env
		cmd.Stdin = bytes.NewReader(stdin)
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = &out
		cmd.WaitDelay = time.Second
		err := cmd.Run()
		cancel()
		if err != nil {
			return fmt.Errorf("%s hook %s: %w: %s", kind, h.Path, err, strings.TrimSpace(out.String()))
		}
	}
	return nil
}
