package service

import (
	"context"
	"errors"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

func specWithNetns(ns *specs.LinuxNamespace, hooks *specs.Hooks) *specs.Spec {
	s := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}}}, Hooks: hooks}
	if ns != nil {
		s.Linux.Namespaces = append(s.Linux.Namespaces, *ns)
	}
	return s
}

func TestSetupNetworkModes(t *testing.T) {
	hook := &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true"}}}
	for _, tc := range []struct {
		name      string
		spec      *specs.Spec
		wantEarly bool
		wantNICs  []vm.NICKind
	}{
		{"new netns: loopback only", specWithNetns(&specs.LinuxNamespace{Type: specs.NetworkNamespace}, nil), false, nil},
		{"new netns with only a poststop hook", specWithNetns(&specs.LinuxNamespace{Type: specs.NetworkNamespace},
			&specs.Hooks{Poststop: []specs.Hook{{Path: "/bin/true"}}}), false, nil},
		{"host network: user-space stack", specWithNetns(nil, hook), false, []vm.NICKind{vm.NICDatagram}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := needsEarlyHooks(tc.spec); got != tc.wantEarly {
				t.Errorf("needsEarlyHooks = %v, want %v", got, tc.wantEarly)
			}
			early := false
			pn, err := setupNetwork(context.Background(), "c1", t.TempDir(), tc.spec, func() error { early = true; return nil })
			if err != nil {
				t.Fatalf("setupNetwork: %v", err)
			}
			defer pn.close()
			if early {
				t.Errorf("early hooks ran for %s", tc.name)
			}
			var kinds []vm.NICKind
			for _, n := range pn.nics() {
				kinds = append(kinds, n.Kind)
			}
			if len(kinds) != len(tc.wantNICs) || (len(kinds) > 0 && kinds[0] != tc.wantNICs[0]) {
				t.Errorf("NICs %v, want %v", kinds, tc.wantNICs)
			}
		})
	}
	if !needsEarlyHooks(specWithNetns(&specs.LinuxNamespace{Type: specs.NetworkNamespace}, hook)) {
		t.Errorf("a new netns with a createRuntime hook (nerdctl) must run the hooks before the VM boots")
	}
}

func TestSetupNetworkRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec *specs.Spec
		want error
	}{
		{"missing netns", specWithNetns(&specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/proc/nonexistent/ns/net"}, nil), errdefs.ErrNotFound},
		{"bad ports annotation", &specs.Spec{Annotations: map[string]string{portsAnnotation: "80"}}, errdefs.ErrInvalidArgument},
	} {
		pn, err := setupNetwork(context.Background(), "c1", t.TempDir(), tc.spec, nil)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
		pn.close()
	}
}

func TestDropNetworkNamespace(t *testing.T) {
	s := specWithNetns(&specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/run/netns/x"}, nil)
	dropNetworkNamespace(s)
	if len(s.Linux.Namespaces) != 1 || s.Linux.Namespaces[0].Type != specs.PIDNamespace {
		t.Errorf("namespaces after drop: %v, want the PID namespace only", s.Linux.Namespaces)
	}
}

// A clone's NICs carry their template's MACs: the agent is told to find
// interface i by vm.TemplateMAC(i) and to set the interface's own MAC.
func TestForClone(t *testing.T) {
	req := &agent.ConfigureNetworkRequest{Interfaces: []*agent.NetworkInterface{
		{DeviceMac: "0a:58:0a:63:00:05", Name: "eth0", Mac: "0a:58:0a:63:00:05", Addresses: []string{"10.99.0.5/24"}},
		{DeviceMac: "5a:94:ef:e4:0c:ee", Name: "eth1"},
	}, Routes: []*agent.Route{{Gateway: "10.99.0.1", Device: "eth0"}}}
	got := forClone(req)
	for i, want := range []struct{ dev, mac string }{
		{vm.TemplateMAC(0).String(), "0a:58:0a:63:00:05"},
		{vm.TemplateMAC(1).String(), "5a:94:ef:e4:0c:ee"},
	} {
		if ifc := got.Interfaces[i]; ifc.DeviceMac != want.dev || ifc.Mac != want.mac {
			t.Errorf("interface %d: device MAC %s, MAC %s; want %s, %s", i, ifc.DeviceMac, ifc.Mac, want.dev, want.mac)
		}
	}
	if ifc := got.Interfaces[0]; ifc.Name != "eth0" || len(ifc.Addresses) != 1 || len(got.Routes) != 1 {
		t.Errorf("the rest of the request changed: %+v", got)
	}
	if req.Interfaces[0].DeviceMac != "0a:58:0a:63:00:05" || req.Interfaces[1].Mac != "" {
		t.Errorf("the network's own request was modified: %+v", req)
	}
}
