package container

import (
	"fmt"

	"github.com/containerd/errdefs"
)

// State is where a process is in its life.
type State int

const (
	// Created: the helper is ready and blocks before execve.
	Created State = iota
	// Running: StartProcess released it (or its execve is under way).
	Running
	// Stopped: it has exited and was reaped.
	Stopped
	// Deleted: it is forgotten; only a stale handle can see this.
	Deleted
)

func (s State) String() string {
	switch s {
	case Created:
		return "created"
	case Running:
		return "running"
	case Stopped:
		return "stopped"
	case Deleted:
		return "deleted"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Op is something asked of a process.
type Op int

const (
	OpStart Op = iota
	OpSignal
	OpExit
	OpDelete
	OpResize
	OpCloseStdin
)

func (o Op) String() string {
	return [...]string{"start", "signal", "exit", "delete", "resize", "close stdin"}[o]
}

// transition is the process state machine: the state after op, or an
// errdefs-classed error when op is illegal in from. Every illegal request is
// ErrFailedPrecondition, except signalling a finished process, which is
// ErrNotFound ("process already finished") so callers can treat it as done.
func transition(from State, op Op) (State, error) {
	switch op {
	case OpExit:
		// An exit is a fact, not a request: it is legal from any live state.
		if from == Deleted {
			return from, nil
		}
		return Stopped, nil
	case OpStart:
		if from == Created {
			return Running, nil
		}
	case OpSignal:
		switch from {
		case Created, Running:
			return from, nil
		case Stopped, Deleted:
			return from, fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
		}
	case OpDelete:
		switch from {
		case Created, Stopped:
			return Deleted, nil
		}
	case OpResize:
		switch from {
		case Created, Running:
			return from, nil
		}
	case OpCloseStdin:
		// Closing the stdin of a finished process is a harmless no-op.
		switch from {
		case Created, Running, Stopped:
			return from, nil
		}
	}
	return from, fmt.Errorf("cannot %s a %s process: %w", op, from, errdefs.ErrFailedPrecondition)
}
