package service

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/network"
	"github.com/macvm/macvm/pkg/vm"
)

// portsAnnotation publishes guest TCP ports on the host for a container on
// host networking (the user-space stack): "8080:80,0.0.0.0:9000:90".
// Containers on a CNI network publish through CNI's portmap instead.
const portsAnnotation = "io.macvm.net.ports"

// netnsAnnotation is how nerdctl's OCI hook learns the network namespace
// to run CNI in when the state's pid (the hypervisor's) is not in it:
// nerdctl documents it for VM-based runtimes.
const netnsAnnotation = "nerdctl/network-namespace"

// podNetwork is what the VM is connected to, decided from the spec's
// network namespace (the VM is the pod's network namespace; see package
// network): at most one of netns and user is set.
type podNetwork struct {
	netns *network.Netns
	user  *network.UserNet
	// ownNetns is a namespace the shim created because the spec asked for
	// a new one and has hooks to fill it (nerdctl's CNI hook); removed
	// after the poststop hooks.
	ownNetns string
}

// needsEarlyHooks tells whether the prestart/createRuntime hooks must run
// before the VM boots: they set up the new network namespace (nerdctl's
// CNI hook) whose interfaces the VM then takes over; a VM's NICs are fixed
// at boot.
func needsEarlyHooks(spec *specs.Spec) bool {
	ns, ok := netnsOf(spec)
	if !ok || ns.Path != "" || spec.Hooks == nil {
		return false
	}
	//nolint:staticcheck // Prestart is deprecated but still what older clients set.
	return len(spec.Hooks.Prestart) > 0 || len(spec.Hooks.CreateRuntime) > 0
}

func netnsOf(spec *specs.Spec) (specs.LinuxNamespace, bool) {
	if spec.Linux == nil {
		return specs.LinuxNamespace{}, false
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return ns, true
		}
	}
	return specs.LinuxNamespace{}, false
}

// setupNetwork prepares the pod's network before the VM boots:
//   - a namespace path: its interfaces are taken over (tap + tc);
//   - a new namespace with hooks: the shim creates the namespace, the
//     hooks (run by early) fill it, then it is taken over;
//   - a new namespace without hooks: nothing, the VM has loopback only;
//   - no namespace (host networking): the user-space NAT stack.
//
// spec is the pod's first container's (the sandbox's); early runs its
// prestart/createRuntime hooks.
func setupNetwork(ctx context.Context, id, stateDir string, spec *specs.Spec, early func() error) (*podNetwork, error) {
	ns, hasNS := netnsOf(spec)
	pn := &podNetwork{}
	switch {
	case hasNS && ns.Path != "":
		n, err := network.OpenNetns(ns.Path)
		if err != nil {
			return nil, fmt.Errorf("pod network: %w", err)
		}
		pn.netns = n
	case hasNS && needsEarlyHooks(spec) && early != nil:
		path := filepath.Join(stateDir, "netns")
		if err := network.CreateNetns(path); err != nil {
			return nil, fmt.Errorf("pod network: %w", err)
		}
		pn.ownNetns = path
		if spec.Annotations == nil {
			spec.Annotations = map[string]string{}
		}
		spec.Annotations[netnsAnnotation] = path
		if err := early(); err != nil {
			return pn, err
		}
		n, err := network.OpenNetns(path)
		if err != nil {
			// Hooks that made no interface: loopback only, like runc.
			log.G(ctx).WithError(err).WithField("container_id", id).Debug("pod network: the hooks left no interface")
			return pn, nil
		}
		pn.netns = n
	case hasNS:
		// A new, empty namespace: loopback only.
	default:
		ports, err := network.ParsePorts(spec.Annotations[portsAnnotation])
		if err != nil {
			return nil, fmt.Errorf("pod network: annotation %s: %w", portsAnnotation, err)
		}
		u, err := network.NewUserNet(ports)
		if err != nil {
			return nil, fmt.Errorf("pod network: %w", err)
		}
		pn.user = u
	}
	return pn, nil
}

// nics are the VM's devices for this network.
func (pn *podNetwork) nics() []vm.NIC {
	switch {
	case pn == nil:
		return nil
	case pn.netns != nil:
		return pn.netns.NICs()
	case pn.user != nil:
		return []vm.NIC{pn.user.NIC()}
	}
	return nil
}

// configure asks the agent to set the NICs up as the network says. A
// clone's NICs (mode not cold) still have their template's MACs, so the
// agent is told to find them by those.
func (pn *podNetwork) configure(ctx context.Context, client agentClient, mode vm.StartMode) error {
	var req *agent.ConfigureNetworkRequest
	switch {
	case pn == nil:
		return nil
	case pn.netns != nil:
		req = pn.netns.GuestConfig()
	case pn.user != nil:
		req = pn.user.GuestConfig()
	default:
		return nil
	}
	if mode != vm.StartCold {
		req = forClone(req)
	}
	_, err := client.ConfigureNetwork(ctx, req)
	return err
}

// forClone is req for a VM cloned from a template: interface i is the
// clone's NIC i, which carries vm.TemplateMAC(i) until the agent sets the
// interface's own MAC (req always names it). req itself is left alone.
func forClone(req *agent.ConfigureNetworkRequest) *agent.ConfigureNetworkRequest {
	out := proto.Clone(req).(*agent.ConfigureNetworkRequest)
	for i, ifc := range out.Interfaces {
		if ifc.Mac == "" {
			// Keep the MAC the host chose: it becomes the interface's.
			ifc.Mac = ifc.DeviceMac
		}
		ifc.DeviceMac = vm.TemplateMAC(i).String()
	}
	return out
}

// reclaim undoes the adoption of a pooled VM's NICs (vm.NIC.Adopt) once
// that VM is given up: the VM started in its place uses the network's
// own backends (nics). Nothing adopted is no error.
func (pn *podNetwork) reclaim() error {
	var errs []error
	for _, n := range pn.nics() {
		if n.Reclaim != nil {
			errs = append(errs, n.Reclaim())
		}
	}
	return errors.Join(errs...)
}

// close releases the network once the VM is gone: taps and tc rules out
// of the namespace, the stack stopped. The shim's own namespace stays until
// removeOwn (after the poststop hooks, which tear CNI down in it).
func (pn *podNetwork) close() error {
	if pn == nil {
		return nil
	}
	var errs []error
	if pn.netns != nil {
		errs = append(errs, pn.netns.Close())
		pn.netns = nil
	}
	if pn.user != nil {
		errs = append(errs, pn.user.Close())
		pn.user = nil
	}
	return errors.Join(errs...)
}

// inHostNamespace tells whether the VM uses a network namespace others see
// (taken over from CNI or made by the shim for hooks): releasing it must be
// done when Delete returns, since the caller goes on with that namespace
// (CNI DEL, removing it, checking it is as CNI left it).
func (pn *podNetwork) inHostNamespace() bool {
	return pn != nil && (pn.netns != nil || pn.ownNetns != "")
}

func (pn *podNetwork) removeOwn() error {
	if pn == nil || pn.ownNetns == "" {
		return nil
	}
	err := network.RemoveNetns(pn.ownNetns)
	pn.ownNetns = ""
	return err
}

// dropNetworkNamespace removes the network namespace from the guest spec:
// the VM is the pod's network namespace, so containers share it.
func dropNetworkNamespace(spec *specs.Spec) {
	if spec.Linux == nil {
		return
	}
	kept := spec.Linux.Namespaces[:0]
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type != specs.NetworkNamespace {
			kept = append(kept, ns)
		}
	}
	spec.Linux.Namespaces = kept
}

// runEarlyHooks runs the prestart and createRuntime hooks before the VM
// exists (the state has no pid yet; the namespace is in netnsAnnotation).
func (c *container) runEarlyHooks(ctx context.Context) error {
	h := c.spec.Hooks
	//nolint:staticcheck // Prestart is deprecated but still what older clients set.
	for _, hs := range []struct {
		kind  string
		hooks []specs.Hook
	}{{"prestart", h.Prestart}, {"createRuntime", h.CreateRuntime}} {
		if err := runHooks(ctx, hs.kind, hs.hooks, c.ociState(specs.StateCreating)); err != nil {
			return err
		}
	}
	c.earlyHooks = true
	return nil
}
