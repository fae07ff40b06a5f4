package service

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/macvm/macvm/pkg/guest/transport"
)

func TestEventQueueDeliversInOrder(t *testing.T) {
	q := NewEventQueue()
	q.OOM("a")
	q.OOM("b")
	evs, err := q.wait(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 2 || evs[0].GetOom().GetContainerId() != "a" || evs[1].GetOom().GetContainerId() != "b" {
		t.Fatalf("events %v, want OOM a then OOM b", evs)
	}
}

func TestEventQueueWaitsForAnEvent(t *testing.T) {
	q := NewEventQueue()
	got := make(chan string, 1)
	go func() {
		evs, err := q.wait(context.Background())
		if err != nil || len(evs) != 1 {
			got <- "error"
			return
		}
		got <- evs[0].GetOom().GetContainerId()
	}()
	time.Sleep(20 * time.Millisecond)
	q.OOM("late")
	select {
	case id := <-got:
		if id != "late" {
			t.Fatalf("got %q, want late", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("wait did not return after an event was queued")
	}
}

func TestEventQueueHonoursContextAndBound(t *testing.T) {
	q := NewEventQueue()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := q.wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait on an empty queue = %v, want DeadlineExceeded", err)
	}
	for i := 0; i < maxQueuedEvents+5; i++ {
		q.OOM("x")
	}
	evs, _ := q.wait(context.Background())
	if len(evs) != maxQueuedEvents {
		t.Fatalf("queued %d events, want the bound %d", len(evs), maxQueuedEvents)
	}
}

func TestStreamsWaitForASession(t *testing.T) {
	s := NewStreams()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	got := make(chan net.Conn, 1)
	go func() {
		c, err := s.Wait(context.Background(), "p1-stdout")
		if err != nil {
			got <- nil
			return
		}
		got <- c
	}()
	time.Sleep(20 * time.Millisecond)
	table := transport.NewStreamTable(0)
	s.set(table)
	table.Put("p1-stdout", a)
	select {
	case c := <-got:
		if c != a {
			t.Fatalf("got %v, want the stream put in the session's table", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return once a session had the stream")
	}
}

func TestStreamsFailOverToNextSession(t *testing.T) {
	s := NewStreams()
	first := transport.NewStreamTable(0)
	s.set(first)
	got := make(chan net.Conn, 1)
	go func() {
		c, _ := s.Wait(context.Background(), "in")
		got <- c
	}()
	time.Sleep(20 * time.Millisecond)
	// The session ends: its table closes; the claim must wait for the next.
	s.set(nil)
	first.Close()
	time.Sleep(20 * time.Millisecond)
	second := transport.NewStreamTable(0)
	s.set(second)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	second.Put("in", a)
	select {
	case c := <-got:
		if c != a {
			t.Fatalf("got %v, want the stream from the second session", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not move on to the next session")
	}
}

func TestStreamsTimeout(t *testing.T) {
	s := NewStreams()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := s.Wait(ctx, "never"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait without a session = %v, want DeadlineExceeded", err)
	}
}
