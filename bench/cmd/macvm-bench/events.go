package main

import (
	"context"
	"sync"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	"github.com/containerd/typeurl/v2"

	"github.com/macvm/macvm/e2e/harness"
)

// Task event topics. The shim stamps each event when it publishes it
// (containerd's shim publisher sets the envelope's timestamp), so their
// times are the shim's view of when create, start, exit and delete
// happened, for runc's shim and ours alike.
const (
	topicCreate = "/tasks/create"
	topicStart  = "/tasks/start"
	topicExit   = "/tasks/exit"
	topicDelete = "/tasks/delete"
)

// eventRecorder keeps the first time each task topic was seen for each
// container's init process.
type eventRecorder struct {
	cancel context.CancelFunc
	done   chan struct{}

	// mu guards seen.
	mu   sync.Mutex
	seen map[string]map[string]time.Time
}

func recordEvents(ctx context.Context, cd *harness.Containerd) (*eventRecorder, error) {
	cl, err := cd.Client()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(cd.Context(ctx))
	r := &eventRecorder{cancel: cancel, done: make(chan struct{}), seen: map[string]map[string]time.Time{}}
	envs, errs := cl.Subscribe(ctx, `topic~="/tasks/"`)
	go func() {
		defer close(r.done)
		defer cl.Close()
		for {
			select {
			case env := <-envs:
				if env == nil {
					continue
				}
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				id := initContainer(v)
				if id == "" {
					continue
				}
				r.mu.Lock()
				m := r.seen[id]
				if m == nil {
					m = map[string]time.Time{}
					r.seen[id] = m
				}
				if _, ok := m[env.Topic]; !ok {
					m[env.Topic] = env.Timestamp
				}
				r.mu.Unlock()
			case <-errs:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	return r, nil
}

// initContainer returns the container id of an event about a container's
// init process ("" for exec events and others).
func initContainer(v any) string {
	switch e := v.(type) {
	case *apievents.TaskCreate:
		return e.ContainerID
	case *apievents.TaskStart:
		return e.ContainerID
	case *apievents.TaskExit:
		if e.ID == e.ContainerID {
			return e.ContainerID
		}
	case *apievents.TaskDelete:
		if e.ID == "" || e.ID == e.ContainerID {
			return e.ContainerID
		}
	}
	return ""
}

// get returns the times recorded for container id, waiting up to timeout
// for the topics in want to have arrived (events are asynchronous).
func (r *eventRecorder) get(id string, timeout time.Duration, want ...string) map[string]time.Time {
	deadline := time.Now().Add(timeout)
	for {
		r.mu.Lock()
		m := map[string]time.Time{}
		for k, v := range r.seen[id] {
			m[k] = v
		}
		r.mu.Unlock()
		all := true
		for _, w := range want {
			if _, ok := m[w]; !ok {
				all = false
			}
		}
		if all || time.Now().After(deadline) {
			return m
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *eventRecorder) stop() {
	r.cancel()
	<-r.done
}
