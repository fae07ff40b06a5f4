package container

import (
	"encoding/json"
	"reflect"
	"testing"
)

// The spare's sample config must survive a round trip whole: a field that
// failed to encode would leave its types' decoder tables unbuilt.
func TestSampleHelperConfigRoundTrip(t *testing.T) {
	want := sampleHelperConfig()
	b, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var got helperConfig
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&got, want) {
		t.Errorf("round trip changed the sample config:\n got %+v\nwant %+v", got, *want)
	}
	l := got.Spec.Linux
	if got.Spec.Process == nil || l == nil || l.Resources == nil || l.Seccomp == nil || len(l.Devices) == 0 || got.Spec.Hooks == nil {
		t.Errorf("sample config lacks parts of a container's spec: %s", b)
	}
}
