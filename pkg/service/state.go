package service

import (
	"fmt"

	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
)

// procState is where a process (the init or an exec) is in its life. The
// shim keeps its own state rather than asking the guest because the guest may
// be gone (VM crash) while containerd still asks about the process.
type procState int

const (
	stateCreated procState = iota
	stateRunning
	statePaused
	stateStopped
	stateDeleted
)

func (s procState) String() string {
	switch s {
	case stateCreated:
		return "created"
	case stateRunning:
		return "running"
	case statePaused:
		return "paused"
	case stateStopped:
		return "stopped"
	case stateDeleted:
		return "deleted"
	}
	return fmt.Sprintf("procState(%d)", int(s))
}

// status maps the shim's state onto containerd's task status.
func (s procState) status() task.Status {
	switch s {
	case stateCreated:
		return task.Status_CREATED
	case stateRunning:
		return task.Status_RUNNING
	case statePaused:
		return task.Status_PAUSED
	case stateStopped:
		return task.Status_STOPPED
	}
	return task.Status_UNKNOWN
}

// procEvent is something that moves a process from one state to another.
type procEvent int

const (
	evStart procEvent = iota
	evPause
	evResume
	evExit
	evDelete
)

func (e procEvent) String() string {
	switch e {
	case evStart:
		return "start"
	case evPause:
		return "pause"
	case evResume:
		return "resume"
	case evExit:
		return "exit"
	case evDelete:
		return "delete"
	}
	return fmt.Sprintf("procEvent(%d)", int(e))
}

// transitions is the whole state machine: anything not listed is illegal.
// A process killed before it was started goes straight from created to
// stopped; a paused process can exit (the VM died, or SIGKILL to a frozen
// cgroup); only a process that is not running can be deleted.
var transitions = map[procState]map[procEvent]procState{
	stateCreated: {evStart: stateRunning, evExit: stateStopped, evDelete: stateDeleted},
	stateRunning: {evPause: statePaused, evExit: stateStopped},
	statePaused:  {evResume: stateRunning, evExit: stateStopped},
	stateStopped: {evDelete: stateDeleted},
	stateDeleted: {},
}

// next returns the state a process in s reaches through e, or an error
// wrapping errdefs.ErrFailedPrecondition when e is not allowed in s, so that
// containerd's clients see the same error class for every illegal request.
func (s procState) next(e procEvent) (procState, error) {
	if to, ok := transitions[s][e]; ok {
		return to, nil
	}
	return s, fmt.Errorf("cannot %s a %s process: %w", e, s, errdefs.ErrFailedPrecondition)
}
