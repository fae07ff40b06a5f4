package main

import (
	"bufio"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// The macvm shim logs two lines on the start path (pkg/service) that split
// the Create RPC: "VM started" (debug) once the hypervisor runs, and "VM
// ready" (info) once the agent answered, with start_mode=cold|template|pool
// and agent_ready=<hypervisor exec to agent answering>. Shims before warm
// start logged "guest agent connected" instead of "VM ready". containerd
// logs "connecting to shim ID" when the shim's bootstrap has returned. The
// benchmark runs containerd at debug level and reads these lines' own time
// stamps back from its log.
const (
	msgShimConnect   = "connecting to shim "
	msgVMStarted     = "VM started"
	msgAgentReady    = "VM ready"
	msgAgentReadyOld = "guest agent connected"
)

// logLine is one logfmt line of containerd's log (its own lines and the
// shims', which containerd copies into it).
type logLine struct {
	Time   time.Time
	Msg    string
	Fields map[string]string
}

// parseLogfmt parses one logrus text-format line: key=value pairs, values
// optionally double-quoted with Go escapes. It returns false for lines that
// are not logfmt or lack a parseable time.
func parseLogfmt(line string) (logLine, bool) {
	fields := map[string]string{}
	s := line
	for {
		s = strings.TrimLeft(s, " ")
		if s == "" {
			break
		}
		eq := strings.IndexByte(s, '=')
		if eq <= 0 || strings.ContainsAny(s[:eq], " \"") {
			return logLine{}, false
		}
		key := s[:eq]
		s = s[eq+1:]
		var val string
		if strings.HasPrefix(s, `"`) {
			// Find the closing quote, skipping escaped ones.
			end := -1
			for i := 1; i < len(s); i++ {
				if s[i] == '\\' {
					i++
					continue
				}
				if s[i] == '"' {
					end = i
					break
				}
			}
			if end < 0 {
				return logLine{}, false
			}
			uq, err := strconv.Unquote(s[:end+1])
			if err != nil {
				return logLine{}, false
			}
			val, s = uq, s[end+1:]
		} else {
			sp := strings.IndexByte(s, ' ')
			if sp < 0 {
				sp = len(s)
			}
			val, s = s[:sp], s[sp:]
		}
		fields[key] = val
	}
	ts, ok := fields["time"]
	if !ok {
		return logLine{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return logLine{}, false
	}
	return logLine{Time: t, Msg: fields["msg"], Fields: fields}, true
}

// startPathTimes holds, per container id, what the start-path log lines
// said about it.
type startPathTimes map[string]*startPath

// startPath is one container's start path as the log tells it.
type startPath struct {
	// At holds the first time of each line, keyed by the message
	// constants above (msgAgentReady for either agent-ready line).
	At map[string]time.Time
	// Mode is the VM's start_mode ("cold", "template", "pool"; "" when
	// the shim did not say), and AgentReady the shim's own hypervisor
	// exec → agent answering time (0 when it did not say).
	Mode       string
	AgentReady time.Duration
	// VMPid is the hypervisor's pid from the last "VM started" line (0
	// when it did not say; the last, since a failed clone's fallback starts
	// a second VM). A pooled VM's qemu is the pool daemon's child, not the
	// shim's, so memory is read through this pid.
	VMPid int
}

// at returns when line msg was logged for the container (zero if never).
func (p *startPath) at(msg string) time.Time {
	if p == nil {
		return time.Time{}
	}
	return p.At[msg]
}

// scanStartPath reads containerd's log for the start-path lines.
func scanStartPath(r io.Reader) (startPathTimes, error) {
	out := startPathTimes{}
	get := func(id string) *startPath {
		if out[id] == nil {
			out[id] = &startPath{At: map[string]time.Time{}}
		}
		return out[id]
	}
	set := func(id, what string, t time.Time) {
		p := get(id)
		if _, ok := p.At[what]; !ok {
			p.At[what] = t
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		text := sc.Text()
		if !strings.Contains(text, msgShimConnect) && !strings.Contains(text, msgVMStarted) &&
			!strings.Contains(text, msgAgentReady) && !strings.Contains(text, msgAgentReadyOld) {
			continue
		}
		l, ok := parseLogfmt(text)
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(l.Msg, msgShimConnect):
			set(strings.TrimSpace(strings.TrimPrefix(l.Msg, msgShimConnect)), msgShimConnect, l.Time)
		case l.Msg == msgVMStarted:
			if id := l.Fields["container_id"]; id != "" {
				set(id, msgVMStarted, l.Time)
				if pid, err := strconv.Atoi(l.Fields["vm_pid"]); err == nil {
					get(id).VMPid = pid
				}
			}
		case l.Msg == msgAgentReady || l.Msg == msgAgentReadyOld:
			id := l.Fields["container_id"]
			if id == "" {
				continue
			}
			p := get(id)
			if _, seen := p.At[msgAgentReady]; seen {
				continue
			}
			p.At[msgAgentReady] = l.Time
			p.Mode = l.Fields["start_mode"]
			if d, err := time.ParseDuration(l.Fields["agent_ready"]); err == nil {
				p.AgentReady = d
			}
		}
	}
	return out, sc.Err()
}

func scanStartPathFile(path string) (startPathTimes, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return scanStartPath(f)
}
