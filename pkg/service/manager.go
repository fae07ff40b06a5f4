package service

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
)

// Manager implements containerd's shim lifecycle for macvm: the `start`
// action (spawn the daemon, answer the bootstrap), the `delete` action
// (clean up after a shim that died) and `-info`.
type Manager struct {
	name string
}

var _ shim.Shim = Manager{}

// NewManager returns the manager for the runtime called name
// (io.containerd.macvm.v1).
func NewManager(name string) Manager { return Manager{name: name} }

// Name is the runtime's name.
func (m Manager) Name() string { return m.name }

// Start spawns the long-running shim (this binary without an action) with
// the listening socket as fd 3 and returns its address. The daemon gets
// /dev/null for stdin, stdout and stderr: containerd reads this process's
// stdout and stderr to EOF, so an inherited descriptor would hang it. If a
// shim already serves the socket, its address is returned instead.
func (m Manager) Start(ctx context.Context, params *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	ns := params.GetNamespace()
	if ns == "" {
		ns, _ = namespaces.Namespace(ctx)
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	id := params.GetInstanceID()
	socketDir := params.GetSocketDir()
	if socketDir == "" {
		socketDir = filepath.Join(defaults.DefaultStateDir, "s")
	}
	result := &bootapi.BootstrapResult{Version: 3, Protocol: "ttrpc"}
	// containerd's mount manager leaves the block images of the erofs
	// snapshotter to the shim, which attaches them as disks (rootfs_block.go).
	if err := result.AddExtension(mountCapabilities); err != nil {
		return nil, fmt.Errorf("bootstrap mount capabilities: %w", err)
	}

	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	// The containers of a pod share one shim (and VM): the socket is keyed
	// on the pod's sandbox ID, so a later container of the pod gets the
	// running shim's address, as with containerd's runc shim.
	annotations, err := bundleAnnotations(cwd)
	if err != nil {
		return nil, err
	}
	address, err := shim.CreateSocketAddress(ctx, socketDir, params.GetContainerdGrpcAddress(), shimGroup(id, annotations), false)
	if err != nil {
		return nil, err
	}
	l, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
		if shim.CanConnect(address) {
			// The delete action of this container, should the shim die,
			// removes the socket by this record.
			if err := os.WriteFile(filepath.Join(cwd, addressFile), []byte(address), 0o600); err != nil {
				return nil, fmt.Errorf("record shim address: %w", err)
			}
			result.Address = address
			return result, nil
		}
		// A dead shim's socket: replace it.
		if err := shim.RemoveSocket(address); err != nil {
			return nil, fmt.Errorf("remove stale shim socket: %w", err)
		}
		if l, err = shim.NewSocket(address); err != nil {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
	}
	f, err := l.File()
	// The daemon serves the socket through the duplicate in f; closing our
	// listener must not unlink the path.
	l.SetUnlinkOnClose(false)
	l.Close()
	if err != nil {
		_ = shim.RemoveSocket(address)
		return nil, err
	}
	defer f.Close()
	defer func() {
		if retErr != nil {
			_ = shim.RemoveSocket(address)
		}
	}()

	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{"-namespace", ns, "-id", id, "-address", params.GetContainerdGrpcAddress()}
	if params.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = cwd
	cmd.Env = os.Environ()
	if a := params.GetContainerdTtrpcAddress(); a != "" {
		cmd.Env = append(cmd.Env, "TTRPC_ADDRESS="+a)
	}
	cmd.ExtraFiles = []*os.File{f}
	// Its own process group: signals to containerd's group (a Ctrl-C in a
	// foreground containerd) must not reach the shim and its VMs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start shim daemon: %w", err)
	}
	// The daemon outlives this process; releasing it avoids a zombie if
	// this process lingers.
	pid := cmd.Process.Pid
	_ = cmd.Process.Release()
	if err := shim.AdjustOOMScore(pid); err != nil {
		log.G(ctx).WithError(err).Debug("adjust shim OOM score")
	}
	// The delete action, run after this shim dies, removes the socket by
	// this record (the daemon removes it itself when it exits cleanly).
	if err := os.WriteFile(filepath.Join(cwd, addressFile), []byte(address), 0o600); err != nil {
		return nil, fmt.Errorf("record shim address: %w", err)
	}
	result.Address = address
	return result, nil
}

// bundleAnnotations reads the annotations of the bundle's OCI spec (the
// manager runs in the bundle directory).
func bundleAnnotations(bundle string) (map[string]string, error) {
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var spec struct {
		Annotations map[string]string `json:"annotations,omitempty"`
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, fmt.Errorf("parse OCI spec: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return spec.Annotations, nil
}

// addressFile in the bundle holds the shim's socket address.
const addressFile = "address"

// Stop is the `delete` action: containerd runs it when a shim is gone
// (crashed, killed) to release what it held. It kills the VM the dead shim
// left behind, unmounts the rootfs and returns the init's recorded exit
// (137 if none was recorded).
func (m Manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	bundle := ""
	if opts, ok := ctx.Value(shim.OptsKey{}).(shim.Opts); ok {
		bundle = opts.BundlePath
	}
	if bundle == "" {
		cwd, err := os.Getwd()
		if err != nil {
			return shim.StopStatus{}, err
		}
		bundle = cwd
	}
	st, err := readBundleState(bundle)
	if err != nil {
		log.G(ctx).WithError(err).Warn("read shim state from bundle")
		st = &bundleState{}
	}
	exitedAt := time.Now()
	address := ""
	if data, err := os.ReadFile(filepath.Join(bundle, addressFile)); err == nil {
		address = string(data)
	}
	// containerd runs this action whenever its connection for a task
	// closes, which also happens after a normal delete of one container of
	// a pod whose shim serves the others on: a shim that still answers
	// keeps its VM, and only this container's host mounts (if its delete
	// left any) go.
	if address != "" && shim.CanConnect(address) {
		if err := undoContainerMounts(st); err != nil {
			log.G(ctx).WithError(err).Warn("undo the container's host mounts")
		}
	} else {
		if killed, err := killLeftoverVM(st); err != nil {
			log.G(ctx).WithError(err).Warn("kill leftover VM")
		} else if killed {
			log.G(ctx).WithField("vm_pid", st.VMPid).Info("killed the VM of a dead shim")
		}
		// The VM is gone, and every container of the pod with it: the
		// whole pod share is unmounted, and the state dir removed only if
		// nothing is left mounted in it.
		if err := undoHostMounts(st); err != nil {
			log.G(ctx).WithError(err).Warn("undo host mounts; VM state dir kept")
		} else if st.VMStateDir != "" {
			if err := os.RemoveAll(st.VMStateDir); err != nil {
				log.G(ctx).WithError(err).Warn("remove VM state dir")
			}
		}
		if address != "" {
			_ = shim.RemoveSocket(address)
		}
	}
	if st.Exit != nil {
		return shim.StopStatus{Pid: int(st.Exit.Pid), ExitStatus: int(st.Exit.Status), ExitedAt: st.Exit.ExitedAt}, nil
	}
	return shim.StopStatus{ExitStatus: exitKilled, ExitedAt: exitedAt}, nil
}

// Info describes the runtime; the options containerd passes are echoed
// back after a check that they parse.
func (m Manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	feats, err := typeurl.MarshalAnyToProto(runtimeFeatures())
	if err != nil {
		return nil, fmt.Errorf("runtime features: %w", err)
	}
	info := &types.RuntimeInfo{
		Name:     m.name,
		Version:  &types.RuntimeVersion{Version: Version},
		Features: feats,
	}
	data, err := io.ReadAll(optionsR)
	if err != nil {
		return nil, err
	}
	if len(data) > 0 {
		opts, err := shim.ReadRuntimeOptions[any](bytes.NewReader(data))
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return nil, fmt.Errorf("runtime options: %w", err)
		}
		if opts != nil {
			if info.Options, err = typeurl.MarshalAnyToProto(opts); err != nil {
				return nil, err
			}
		}
	}
	return info, nil
}

// runtimeFeatures is what the shim offers, in the OCI runtime-spec's
// features format (as `runc features` prints it). containerd's CRI reads
// MountOptions: "rro" there makes it offer recursive read-only volumes on
// this runtime handler (podshare.go makes them read-only on the host and
// in the guest). Only the bind mount options the shim itself interprets
// are listed.
func runtimeFeatures() *features.Features {
	return &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		MountOptions:  []string{"bind", "rbind", "ro", "rw", "rro"},
	}
}
