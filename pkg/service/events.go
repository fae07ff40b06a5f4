package service

import (
	"context"
	"sync"

	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/log"
)

// eventQueue publishes task events to containerd strictly in the order they
// were sent, from one goroutine. Ordering is a correctness property, not a
// nicety: containerd's clients expect TaskStart before TaskExit and every
// exec's TaskExit before the init's, and the only way to keep that promise
// while exits arrive on many goroutines is to decide the order under the
// process locks (by calling send there) and never reorder afterwards.
//
// The queue is unbounded so that send never blocks: it is called with process
// locks held, and a stalled containerd must not freeze the shim's RPCs.
type eventQueue struct {
	ctx context.Context
	pub Publisher

	// mu guards items and closed.
	mu     sync.Mutex
	items  []any
	closed bool

	// wake has room for one pending notification; send never blocks on it.
	wake chan struct{}
	// done is closed when the publishing goroutine has returned.
	done chan struct{}
}

func newEventQueue(ctx context.Context, pub Publisher) *eventQueue {
	q := &eventQueue{
		ctx:  context.WithoutCancel(ctx),
		pub:  pub,
		wake: make(chan struct{}, 1),
		done: make(chan struct{}),
	}
	go q.run()
	return q
}

// send queues evt (one of containerd's api/events messages). Events sent
// after close are dropped: the shim is exiting and nobody would receive them.
func (q *eventQueue) send(evt any) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		log.G(q.ctx).WithField("topic", runtime.GetTopic(evt)).Warn("event dropped: shim is shutting down")
		return
	}
	q.items = append(q.items, evt)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// close stops accepting events and waits until the queued ones are
// published or ctx ends.
func (q *eventQueue) close(ctx context.Context) {
	q.mu.Lock()
	already := q.closed
	q.closed = true
	q.mu.Unlock()
	if !already {
		select {
		case q.wake <- struct{}{}:
		default:
		}
	}
	select {
	case <-q.done:
	case <-ctx.Done():
	}
}

func (q *eventQueue) run() {
	defer close(q.done)
	for range q.wake {
		for {
			q.mu.Lock()
			if len(q.items) == 0 {
				closed := q.closed
				q.mu.Unlock()
				if closed {
					return
				}
				break
			}
			evt := q.items[0]
			q.items[0] = nil
			q.items = q.items[1:]
			q.mu.Unlock()

			topic := runtime.GetTopic(evt)
			if err := q.pub.Publish(q.ctx, topic, evt); err != nil {
				log.G(q.ctx).WithError(err).WithField("topic", topic).Error("publish event")
			}
		}
	}
}
