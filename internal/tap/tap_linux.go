// Package tap opens tap devices the way QEMU's tap netdev expects them:
// no packet-information header, with virtio-net headers (IFF_VNET_HDR),
// so QEMU can offer the guest checksum and segmentation offloads. It is
// shared by the pod network's taps (pkg/network) and the stand-in taps
// a warm-start template is built with (pkg/vm): both must open them alike,
// or the virtio-net features saved in a template would not match a clone's.
package tap

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Open creates (or attaches to) the tap name in the calling thread's
// network namespace and returns its open queue.
func Open(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}
