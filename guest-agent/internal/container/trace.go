package container

import (
	"fmt"
	"strings"
	"time"
)

// helperTrace times the helper's steps when the agent asks for it
// (helperConfig.Trace, macvm.debug=1): the helper is most of a warm
// start's create under emulation, and the agent's trace sees only its
// total ("helper ready"). The steps travel to the agent in the "ready"
// message, which logs them beside its own.
type helperTrace struct {
	on    bool
	last  time.Time
	steps []string
}

// mark ends the step that began at the previous mark (or at start).
func (t *helperTrace) mark(step string) { t.markAt(step, time.Now()) }

// markAt is mark for a step that ended at now.
func (t *helperTrace) markAt(step string, now time.Time) {
	if !t.on {
		return
	}
	t.steps = append(t.steps, fmt.Sprintf("%s %.1fms", step, float64(now.Sub(t.last).Microseconds())/1000))
	t.last = now
}

func (t *helperTrace) String() string { return strings.Join(t.steps, ", ") }
