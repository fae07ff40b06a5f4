package main

import (
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/bench/internal/stats"
)

func TestParseLogfmt(t *testing.T) {
	line := `time="2026-11-28T22:06:10.123456789Z" level=debug msg="guest agent connected" boot=2.5s container_id=macvm-run-2 namespace=bench`
	l, ok := parseLogfmt(line)
	if !ok {
		t.Fatalf("parseLogfmt(%q) failed", line)
	}
	want := time.Date(2026, 11, 28, 22, 6, 10, 123456789, time.UTC)
	if !l.Time.Equal(want) || l.Msg != "guest agent connected" || l.Fields["container_id"] != "macvm-run-2" || l.Fields["boot"] != "2.5s" {
		t.Errorf("got %+v", l)
	}
	for _, bad := range []string{"", "plain text", `msg="no time"`, `time="yesterday" msg=x`, `time="2026-11-28T22:06:10Z" msg="unterminated`} {
		if _, ok := parseLogfmt(bad); ok {
			t.Errorf("parseLogfmt(%q) accepted", bad)
		}
	}
	l, ok = parseLogfmt(`time="2026-11-28T22:06:10Z" msg="say \"hi\"" k=v`)
	if !ok || l.Msg != `say "hi"` || l.Fields["k"] != "v" {
		t.Errorf("escaped quotes: %+v %v", l, ok)
	}
}

func TestScanStartPath(t *testing.T) {
	log := strings.Join([]string{
		`time="2026-11-28T22:06:10.000000000Z" level=info msg="connecting to shim macvm-run-2" address="unix:///s/x" namespace=bench protocol=ttrpc version=3`,
		`time="2026-11-28T22:06:10.500000000Z" level=debug msg="VM started" container_id=macvm-run-2 vm_pid=42`,
		`time="2026-11-28T22:06:12.000000000Z" level=info msg="VM ready" agent_ready=1.75s container_id=macvm-run-2 start_mode=template`,
		`time="2026-11-28T22:06:13.000000000Z" level=debug msg="VM started" container_id=macvm-run-2 vm_pid=43`,
		`time="2026-11-28T22:06:14.000000000Z" level=info msg="VM ready" agent_ready=9s container_id=macvm-run-2 start_mode=cold`,
		`time="2026-11-28T22:06:15.000000000Z" level=debug msg="guest agent connected" boot=1.5s container_id=old-1`,
		`time="2026-11-28T22:06:13.000000000Z" level=info msg="loading plugin" id=x`,
	}, "\n")
	got, err := scanStartPath(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	m := got["macvm-run-2"]
	if d := m.at(msgAgentReady).Sub(m.at(msgVMStarted)); d != 1500*time.Millisecond {
		t.Errorf("boot phase = %v, want 1.5s (the first VM started and VM ready lines count)", d)
	}
	if d := m.at(msgVMStarted).Sub(m.at(msgShimConnect)); d != 500*time.Millisecond {
		t.Errorf("vm start phase = %v, want 500ms", d)
	}
	if m.VMPid != 43 {
		t.Errorf("vm pid %d, want 43 (the last VM started line: the VM that serves the container)", m.VMPid)
	}
	if m.Mode != "template" || m.AgentReady != 1750*time.Millisecond {
		t.Errorf("start mode %q, agent_ready %v; want template, 1.75s", m.Mode, m.AgentReady)
	}
	if old := got["old-1"]; old.at(msgAgentReady).IsZero() || old.Mode != "" {
		t.Errorf("the pre-warm-start line: %+v", old)
	}
	if none := got["nobody"]; !none.at(msgVMStarted).IsZero() {
		t.Errorf("a container never logged has times: %+v", none)
	}
}

func TestParseBench(t *testing.T) {
	out := `goos: linux
BenchmarkStreamThroughput/window=256KiB-2         	     100	   1000000 ns/op	1048.58 MB/s
BenchmarkRoundTrip-2   	   20000	     52000 ns/op
PASS
ok  	github.com/macvm/macvm/pkg/guest/transport	3.1s`
	rs := parseBench(out)
	if len(rs) != 2 {
		t.Fatalf("parsed %d results, want 2: %+v", len(rs), rs)
	}
	if rs[0].Name != "StreamThroughput/window=256KiB" || rs[0].MBPerS != 1048.58 || rs[0].Iters != 100 {
		t.Errorf("first = %+v", rs[0])
	}
	if rs[1].Name != "RoundTrip" || rs[1].NsPerOp != 52000 || rs[1].MBPerS != 0 {
		t.Errorf("second = %+v", rs[1])
	}
}

func TestFindBanner(t *testing.T) {
	img := []byte("\x00junk Linux version %s (%s)\x00more Linux version 6.1.0-56-amd64 (dk@debian.org) (gcc-12) #1 SMP Debian 6.1.192-2 (2026-11-16)\n\x00tail")
	got, err := findBanner(img)
	if err != nil || got != "6.1.0-56-amd64 #1 SMP Debian 6.1.192-2 (2026-11-16)" {
		t.Errorf("findBanner = %q, %v", got, err)
	}
	if _, err := findBanner([]byte("no banner here")); err == nil {
		t.Error("findBanner found a banner in none")
	}
}

func TestTargetMet(t *testing.T) {
	s := stats.Of([]float64{10, 12, 14})
	for _, tc := range []struct {
		t         Target
		ratio     float64
		met, know bool
	}{
		{Target{Ratio: true, Max: true, Value: 2.5}, 2.0, true, true},
		{Target{Ratio: true, Max: true, Value: 2.5}, 3.0, false, true},
		{Target{Ratio: true, Max: false, Value: 0.7}, 0.5, false, true},
		{Target{Ratio: true, Max: true, Value: 2.5}, math.NaN(), false, false},
		{Target{Ratio: false, Max: true, Value: 15}, math.NaN(), true, true},
		{Target{Ratio: false, Max: true, Value: 11}, math.NaN(), false, true},
	} {
		met, known := tc.t.Met(s, tc.ratio)
		if met != tc.met || known != tc.know {
			t.Errorf("%+v with ratio %v: met %v known %v, want %v %v", tc.t, tc.ratio, met, known, tc.met, tc.know)
		}
	}
}

func TestRenderMarkdown(t *testing.T) {
	r := &Results{Mode: "quick", Variants: []VariantInfo{{Name: "runc"}, {Name: "macvm", Kernel: "6.1.0"}}}
	r.Machine.Cores, r.Machine.Accel = 2, "TCG"
	m := r.metric("run.wall", GroupLatency, "run", "s", ratioMax(2.5))
	for _, x := range []float64{1, 2, 3} {
		m.add("runc", x)
		m.add("macvm", 2*x)
	}
	r.metric("mem.hv_rss", GroupMemory, "hv", "MiB", vmOnly).add("macvm", 100)
	md := renderMarkdown(r)
	for _, want := range []string{
		"| run | s, lower is better | 2.000 (1.000–3.000, n=3) | 4.000 (2.000–6.000, n=3) | 2.00× | ≤ 2.5× runc: macvm met |",
		"| hv | MiB, lower is better | — | 100.0 (n=1) | — |",
		"**TCG**",
		"guest kernel of `macvm` | 6.1.0",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

func TestDDRecords(t *testing.T) {
	if got := ddRecords("64+0 records in\n64+0 records out\n"); got != "64+0" {
		t.Errorf("ddRecords = %q, want 64+0", got)
	}
	if got := ddRecords("dd: can't open\n"); got != "" {
		t.Errorf("ddRecords without a summary = %q, want empty", got)
	}
}

func TestUpdateReadme(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/README.md"
	orig := "# x\n\nbefore\n" + readmeBegin + "\nold table\n" + readmeEnd + "\nafter\n"
	if err := os.WriteFile(path, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	r := &Results{Mode: "quick", Variants: []VariantInfo{{Name: "runc"}, {Name: "macvm"}}}
	r.Machine.Cores, r.Machine.Accel = 2, "TCG"
	m := r.metric("exec.wall", GroupLatency, "exec", "s", ratioMax(1.5))
	m.add("runc", 0.2)
	m.add("macvm", 0.25)
	if err := updateReadme(path, r, "bench/results/x.md"); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	s := string(got)
	for _, want := range []string{"before\n" + readmeBegin, readmeEnd + "\nafter\n", "| exec (s) | 0.200 | 0.250 | 1.25× | ≤ 1.5× runc: macvm met |", "bench/results/x.md"} {
		if !strings.Contains(s, want) {
			t.Errorf("README lacks %q:\n%s", want, s)
		}
	}
	if strings.Contains(s, "old table") {
		t.Error("the old section was kept")
	}
	if err := updateReadme(dir+"/none.md", r, "x"); err == nil {
		t.Error("a missing README was accepted")
	}
}

// A target set by another issue names it; issue 5's (the default) do not.
func TestTargetCellIssue(t *testing.T) {
	r := &Results{}
	m := r.metric("density.hv_pss_each", GroupDensity, "hypervisor PSS per container", "MiB", vmOnly, absMax(40e6/mib), issue(8))
	m.add("macvm-template", 45)
	m.add("macvm-pool", 30)
	got := targetCell(m, []string{"macvm-template", "macvm-pool"}, stats.Summary{})
	if want := "issue 8: ≤ 38.1 MiB: macvm-template **not met**, macvm-pool met"; got != want {
		t.Errorf("target cell %q, want %q", got, want)
	}
	m5 := r.metric("mem.shim_rss", GroupMemory, "shim RSS", "MiB", absMax(15))
	m5.add("macvm", 10)
	if got := targetCell(m5, []string{"macvm"}, stats.Summary{}); got != "≤ 15.0 MiB: macvm met" {
		t.Errorf("issue-5 target cell %q", got)
	}
}
