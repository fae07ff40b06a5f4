package service

import (
	"context"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// maxQueuedEvents bounds the queue when no host is polling; the oldest
// events are dropped first.
const maxQueuedEvents = 1024

// EventQueue holds events until a WaitEvents call takes them.
type EventQueue struct {
	// mu guards events and notify.
	mu     sync.Mutex
	events []*agent.Event
	// notify is closed (and replaced) whenever an event is queued.
	notify chan struct{}
}

// NewEventQueue returns an empty queue.
func NewEventQueue() *EventQueue {
	return &EventQueue{notify: make(chan struct{})}
}

// OOM queues an OOM event for a container; it is the container manager's
// OOM callback.
func (q *EventQueue) OOM(containerID string) {
	q.push(&agent.Event{
		Timestamp: timestamppb.New(time.Now()),
		Event:     &agent.Event_Oom{Oom: &agent.OOMEvent{ContainerId: containerID}},
	})
}

func (q *EventQueue) push(e *agent.Event) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.events = append(q.events, e)
	if over := len(q.events) - maxQueuedEvents; over > 0 {
		q.events = q.events[over:]
	}
	close(q.notify)
	q.notify = make(chan struct{})
}

// wait returns every queued event, waiting for at least one until ctx ends.
func (q *EventQueue) wait(ctx context.Context) ([]*agent.Event, error) {
	for {
		q.mu.Lock()
		if len(q.events) > 0 {
			evs := q.events
			q.events = nil
			q.mu.Unlock()
			return evs, nil
		}
		notify := q.notify
		q.mu.Unlock()
		select {
		case <-notify:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
