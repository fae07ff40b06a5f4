package service

import (
	"fmt"
	"strings"
	"testing"
)

// The console gets a host session's unexpected yamux errors, not the
// stale session's end on the next host's padding that every warm start
// has, nor what serveSession reports itself or routine warnings.
func TestSessionLogFilter(t *testing.T) {
	var got []string
	l := sessionLog{logf: func(format string, args ...any) { got = append(got, fmt.Sprintf(format, args...)) }}
	l.Printf("[ERR] yamux: Invalid protocol version: %d", 255)        // the padding: expected
	l.Printf("[ERR] yamux: Failed to read header: %v", "i/o timeout") // serveSession reports it
	l.Printf("[ERR] yamux: Failed to write header: %v", "write: use of closed network connection")
	l.Printf("[WARN] yamux: frame for missing stream: %v", "hdr") // routine
	l.Printf("[ERR] yamux: Invalid protocol version: %d", 73)     // a desync: reported
	l.Print("[ERR] yamux: duplicate stream declared")             // reported
	if len(got) != 2 || !strings.Contains(got[0], "version: 73") || !strings.Contains(got[1], "duplicate stream") {
		t.Errorf("logged %q, want the version-73 and duplicate-stream errors only", got)
	}
}
