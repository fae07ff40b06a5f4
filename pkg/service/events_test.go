package service

import (
	"context"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"
)

// recorder is a publisher that remembers what it got, in order.
type recorder struct {
	// mu guards topics and evts.
	mu     sync.Mutex
	topics []string
	evts   []any
	// delay slows every publish, to let a backlog build up.
	delay time.Duration
}

func (r *recorder) Publish(ctx context.Context, topic string, evt events.Event) error {
	if r.delay > 0 {
		time.Sleep(r.delay)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.topics = append(r.topics, topic)
	r.evts = append(r.evts, evt)
	return nil
}

func (r *recorder) snapshot() ([]string, []any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.topics...), append([]any(nil), r.evts...)
}

// waitFor polls until the recorder has n events.
func (r *recorder) waitFor(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		topics, _ := r.snapshot()
		if len(topics) >= n {
			return topics
		}
		if time.Now().After(deadline) {
			t.Fatalf("got events %v, want at least %d", topics, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestEventQueueKeepsOrder(t *testing.T) {
	rec := &recorder{delay: time.Millisecond}
	q := newEventQueue(context.Background(), rec)
	const n = 200
	for i := range n {
		q.send(&eventstypes.TaskExit{ContainerID: "c", Pid: uint32(i)})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q.close(ctx)
	topics, evts := rec.snapshot()
	if len(evts) != n {
		t.Fatalf("published %d events, want %d", len(evts), n)
	}
	for i, e := range evts {
		if got := e.(*eventstypes.TaskExit).Pid; got != uint32(i) {
			t.Fatalf("event %d has pid %d: order lost", i, got)
		}
		if topics[i] != "/tasks/exit" {
			t.Fatalf("topic %q, want /tasks/exit", topics[i])
		}
	}
	q.send(&eventstypes.TaskExit{ContainerID: "late"})
	if _, evts := rec.snapshot(); len(evts) != n {
		t.Errorf("an event sent after close was published")
	}
}

// TestEventQueueSendNeverBlocks checks that a stalled containerd does not
// stall the shim: send returns at once however slow publishing is.
func TestEventQueueSendNeverBlocks(t *testing.T) {
	block := make(chan struct{})
	q := newEventQueue(context.Background(), publishFunc(func() { <-block }))
	start := time.Now()
	for range 5000 {
		q.send(&eventstypes.TaskOOM{ContainerID: "c"})
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("send blocked for %v behind a stalled publisher", d)
	}
	close(block)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q.close(ctx)
}

type publishFunc func()

func (f publishFunc) Publish(context.Context, string, events.Event) error { f(); return nil }
