package critest

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func run(handler string, states map[string]string) *Run {
	r := &Run{Handler: handler, Specs: map[string]Outcome{}}
	for n, s := range states {
		r.Specs[n] = Outcome{Name: n, State: s, Failure: handler + " says no"}
	}
	return r
}

// TestCompare checks the classification the acceptance rests on: a spec counts against macvm only when
// it passed on runc, and only an explained difference is tolerated.
func TestCompare(t *testing.T) {
	runc := run("runc", map[string]string{"a": "passed", "b": "passed", "c": "failed", "d": "skipped", "e": "passed"})
	macvm := run("macvm", map[string]string{"a": "passed", "b": "failed", "c": "passed", "d": "skipped", "e": "timedout"})
	old := Differences
	Differences = map[string]string{"e": "the reason"}
	defer func() { Differences = old }()

	c := Compare(runc, macvm, "", "")
	if want := []string{"b", "e"}; !reflect.DeepEqual(c.Regressions, want) {
		t.Errorf("regressions %v, want %v", c.Regressions, want)
	}
	if want := []string{"b"}; !reflect.DeepEqual(c.Unexplained, want) {
		t.Errorf("unexplained %v, want %v", c.Unexplained, want)
	}
	if want := []string{"c"}; !reflect.DeepEqual(c.Gains, want) {
		t.Errorf("gains %v, want %v", c.Gains, want)
	}
	md := c.Markdown(time.Unix(0, 0))
	for _, want := range []string{"- `e` (timedout): the reason", "- `b` (failed): UNEXPLAINED: macvm says no", "| runc | 5 | 3 | 1 | 1 |"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

// TestOverlayAndKnown checks a focused rerun replacing outcomes (and saying so) and a known runc
// failure printed with its reason.
func TestOverlayAndKnown(t *testing.T) {
	runc := run("runc", map[string]string{"a": "passed", "k": "failed"})
	macvm := run("macvm", map[string]string{"a": "failed", "k": "failed"})
	macvm.Overlay(run("macvm", map[string]string{"a": "passed", "k": "skipped"}))
	if got := macvm.Specs["a"].State; got != "passed" {
		t.Errorf("a after the rerun: %s, want passed", got)
	}
	if got := macvm.Specs["k"].State; got != "failed" {
		t.Errorf("k, skipped by the rerun: %s, want its first outcome, failed", got)
	}
	if want := []string{"a"}; !reflect.DeepEqual(macvm.Rerun, want) {
		t.Errorf("rerun %v, want %v", macvm.Rerun, want)
	}
	old := Known
	Known = map[string]string{"k": "the harness lacks it"}
	defer func() { Known = old }()
	c := Compare(runc, macvm, "", "")
	if len(c.Regressions) != 0 {
		t.Errorf("regressions %v, want none", c.Regressions)
	}
	md := c.Markdown(time.Unix(0, 0))
	for _, want := range []string{"- `k`: the harness lacks it (runc: runc says no)", "On macvm, 1 specs come from a later focused rerun (after a fix): `a`."} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}
