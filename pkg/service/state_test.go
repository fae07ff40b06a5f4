package service

import (
	"testing"

	"github.com/containerd/errdefs"
)

// TestStateTransitions checks every (state, event) pair against the
// intended machine: the legal moves land where they should, and every
// other move is refused with ErrFailedPrecondition, leaving the state as is.
func TestStateTransitions(t *testing.T) {
	legal := map[procState]map[procEvent]procState{
		stateCreated: {evStart: stateRunning, evExit: stateStopped, evDelete: stateDeleted},
		stateRunning: {evPause: statePaused, evExit: stateStopped},
		statePaused:  {evResume: stateRunning, evExit: stateStopped},
		stateStopped: {evDelete: stateDeleted},
	}
	states := []procState{stateCreated, stateRunning, statePaused, stateStopped, stateDeleted}
	evs := []procEvent{evStart, evPause, evResume, evExit, evDelete}
	for _, from := range states {
		for _, ev := range evs {
			got, err := from.next(ev)
			want, ok := legal[from][ev]
			if ok {
				if err != nil || got != want {
					t.Errorf("%s --%s--> got (%s, %v), want (%s, nil)", from, ev, got, err, want)
				}
				continue
			}
			if !errdefs.IsFailedPrecondition(err) {
				t.Errorf("%s --%s--> got error %v, want ErrFailedPrecondition", from, ev, err)
			}
			if got != from {
				t.Errorf("%s --%s--> illegal move changed the state to %s", from, ev, got)
			}
		}
	}
}

func TestStateStatus(t *testing.T) {
	for s, want := range map[procState]string{
		stateCreated: "CREATED", stateRunning: "RUNNING", statePaused: "PAUSED", stateStopped: "STOPPED", stateDeleted: "UNKNOWN",
	} {
		if got := s.status().String(); got != want {
			t.Errorf("%s.status() = %s, want %s", s, got, want)
		}
	}
}
