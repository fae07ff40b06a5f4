package service

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// minReseedBytes is the least entropy Reseed accepts: a full CRNG seed.
const minReseedBytes = 32

// maxReseedBytes bounds the request (the kernel caps the credit anyway).
const maxReseedBytes = 4096

// Reseed gives a VM its own random stream. A warm-start clone resumes with
// its template's kernel RNG state, the same in every clone; the host's
// entropy goes into the input pool with RNDADDENTROPY (credited, which
// needs CAP_SYS_ADMIN: the agent is PID 1) and RNDRESEEDCRNG makes the
// CRNG draw from it now instead of at its next scheduled reseed. After it,
// /dev/urandom and getrandom differ between clones; so does everything
// the agent derives from them (transport nonces use crypto/rand, which
// reads getrandom every time). What cannot be reseeded: the Go runtime's
// internal seed (map hashing, select order, math/rand's global source) and
// the kernel's boot_id, which stay the template's; neither is used for
// anything secret. Processes started afterwards get fresh AT_RANDOM.
func (s *Service) Reseed(ctx context.Context, req *agent.ReseedRequest) (*emptypb.Empty, error) {
	return empty(reseed(req.GetEntropy()))
}

func reseed(entropy []byte) error {
	if len(entropy) < minReseedBytes || len(entropy) > maxReseedBytes {
		return fmt.Errorf("reseed: %d bytes of entropy, want %d to %d: %w", len(entropy), minReseedBytes, maxReseedBytes, errdefs.ErrInvalidArgument)
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("reseed: %w", err)
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(entropy))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(entropy)*8)) // bits credited
	binary.NativeEndian.PutUint32(info[4:], uint32(len(entropy)))
	copy(info[8:], entropy)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("reseed: RNDADDENTROPY: %v: %w", errno, errdefs.ErrPermissionDenied)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("reseed: RNDRESEEDCRNG: %v: %w", errno, errdefs.ErrPermissionDenied)
	}
	return nil
}
