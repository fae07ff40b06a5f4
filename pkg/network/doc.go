// Package network carries a pod's network into its VM. The VM is the pod's
// network namespace (containers in it never get one of their own), and
// what it is connected to follows the OCI spec, as runc users expect:
//
//   - a new, empty network namespace: no NIC, loopback only;
//   - a network namespace path prepared by CNI: the namespace's interfaces
//     are taken over by the VM through a tap in the namespace, redirected to
//     and from the CNI interface with tc (netns_linux.go);
//   - no network namespace (host networking): a user-space NAT stack with
//     DNS in the shim, github.com/containers/gvisor-tap-vsock, connected to
//     the VM through a datagram socket pair (usernet.go), the same on Linux
//     and macOS.
//
// Each mode yields the vm.NICs for the VM's config and the agent request
// that gives the guest's NICs their MAC, name, MTU, addresses and routes.
package network
