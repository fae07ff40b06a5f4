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
