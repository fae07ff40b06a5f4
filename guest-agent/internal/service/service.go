// Package service is the agent's ttrpc AgentService: thin handlers that look
// up a container or process, call into package container, and convert
// errdefs errors to gRPC statuses at this boundary only.
package service

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/macvm/macvm/guest-agent/internal/container"
	"github.com/macvm/macvm/guest-agent/internal/network"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// Version is the agent's version, set at link time (-X).
var Version = "dev"

// ProtocolVersion is the agent protocol this service speaks (api/v1).
const ProtocolVersion = 1

// Service implements agent.AgentService.
type Service struct {
	containers *container.Manager
	events     *EventQueue
	started    time.Time
	cgroupRoot string
	// powerOff is called (after the reply is on its way) by Shutdown.
	powerOff func()
	// network configures the VM's NICs; nil outside a VM (see SetNetwork).
	network *network.Configurator
}

var _ agent.AgentService = (*Service)(nil)

// New returns the service over a container manager. events must be the
// queue the manager's OOM callback feeds (see NewEventQueue).
func New(m *container.Manager, events *EventQueue, cgroupRoot string, powerOff func()) *Service {
	return &Service{containers: m, events: events, started: time.Now(), cgroupRoot: cgroupRoot, powerOff: powerOff}
}

func toGRPC(err error) error {
	if err == nil {
		return nil
	}
	return errgrpc.ToGRPC(err)
}

func empty(err error) (*emptypb.Empty, error) {
	if err != nil {
		return nil, toGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) Info(ctx context.Context, _ *emptypb.Empty) (*agent.InfoResponse, error) {
	var uts unix.Utsname
	unix.Uname(&uts)
	var si unix.Sysinfo_t
	unix.Sysinfo(&si)
	var controllers []string
	if b, err := os.ReadFile(filepath.Join(s.cgroupRoot, "cgroup.controllers")); err == nil {
		controllers = strings.Fields(string(b))
	}
	return &agent.InfoResponse{
		AgentVersion:      Version,
		ProtocolVersion:   ProtocolVersion,
		KernelRelease:     unix.ByteSliceToString(uts.Release[:]),
		BootTime:          timestamppb.New(s.started),
		CgroupControllers: controllers,
		Cpus:              uint32(runtime.NumCPU()),
		MemoryBytes:       uint64(si.Totalram) * uint64(si.Unit),
		ModulesLoaded:     s.containers.MountsReady() && s.containers.SpareSettled(),
	}, nil
}

func (s *Service) SetTime(ctx context.Context, req *agent.SetTimeRequest) (*emptypb.Empty, error) {
	if req.Time == nil {
		return empty(fmt.Errorf("time is required: %w", errdefs.ErrInvalidArgument))
	}
	ts := unix.NsecToTimespec(req.Time.AsTime().UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return empty(fmt.Errorf("set clock: %v: %w", err, errdefs.ErrPermissionDenied))
	}
	return &emptypb.Empty{}, nil
}

func stdio(s *agent.Stdio) container.Stdio {
	if s == nil {
		return container.Stdio{}
	}
	return container.Stdio{Stdin: s.Stdin, Stdout: s.Stdout, Stderr: s.Stderr, Terminal: s.Terminal}
}

func (s *Service) CreateContainer(ctx context.Context, req *agent.CreateContainerRequest) (*agent.CreateContainerResponse, error) {
	mounts := make([]container.Mount, len(req.Rootfs))
	for i, m := range req.Rootfs {
		mounts[i] = container.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options}
	}
	devices := make([]container.BlockDevice, len(req.BlockDevices))
	for i, d := range req.BlockDevices {
		devices[i] = container.BlockDevice{Serial: d.Serial, Index: int(d.Index), FSType: d.Fstype, Options: d.Options, Path: d.Path, Mkdirs: d.Mkdirs}
	}
	c, err := s.containers.Create(ctx, req.ContainerId, req.Spec, devices, mounts, stdio(req.Stdio), req.NoSpare)
	if err != nil {
		return nil, toGRPC(err)
	}
	return &agent.CreateContainerResponse{Pid: uint32(c.Init().Pid())}, nil
}

// process looks up a container's process, as an errdefs error if missing.
func (s *Service) process(containerID, execID string) (*container.Container, *container.Process, error) {
	c, err := s.containers.Get(containerID)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.Process(execID)
	if err != nil {
		return nil, nil, err
	}
	if p == nil {
		return nil, nil, fmt.Errorf("exec %q is still being created: %w", execID, errdefs.ErrFailedPrecondition)
	}
	return c, p, nil
}

func (s *Service) StartProcess(ctx context.Context, req *agent.StartProcessRequest) (*agent.StartProcessResponse, error) {
	_, p, err := s.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := p.Start(); err != nil {
		return nil, toGRPC(err)
	}
	return &agent.StartProcessResponse{Pid: uint32(p.Pid())}, nil
}

func (s *Service) ExecProcess(ctx context.Context, req *agent.ExecProcessRequest) (*emptypb.Empty, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return empty(err)
	}
	_, err = c.Exec(ctx, req.ExecId, req.Process, stdio(req.Stdio))
	return empty(err)
}

func (s *Service) SignalProcess(ctx context.Context, req *agent.SignalProcessRequest) (*emptypb.Empty, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return empty(err)
	}
	if req.Signal == 0 || req.Signal > 64 {
		return empty(fmt.Errorf("signal %d: %w", req.Signal, errdefs.ErrInvalidArgument))
	}
	return empty(c.Signal(req.ExecId, unix.Signal(req.Signal), req.All))
}

func (s *Service) WaitProcess(ctx context.Context, req *agent.WaitProcessRequest) (*agent.WaitProcessResponse, error) {
	c, p, err := s.process(req.ContainerId, req.ExecId)
	if err != nil {
		return nil, toGRPC(err)
	}
	status, at, err := p.Wait(ctx)
	if err != nil {
		return nil, toGRPC(err)
	}
	resp := &agent.WaitProcessResponse{ExitStatus: status, ExitedAt: timestamppb.New(at)}
	if req.ExecId == "" {
		// The host keeps the last stats of an exited container; sent with
		// the exit, they cost it no round trip before TaskExit. Best
		// effort: without them the host asks Stats.
		if m, err := c.Stats(); err == nil {
			resp.Metrics = m
		}
	}
	return resp, nil
}

func (s *Service) DeleteProcess(ctx context.Context, req *agent.DeleteProcessRequest) (*emptypb.Empty, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return empty(err)
	}
	return empty(c.DeleteProcess(req.ExecId))
}

// deleteTimeout bounds a delete whose caller set no deadline.
const deleteTimeout = 10 * time.Second

func (s *Service) DeleteContainer(ctx context.Context, req *agent.DeleteContainerRequest) (*emptypb.Empty, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, deleteTimeout)
		defer cancel()
	}
	return empty(s.containers.Delete(ctx, req.ContainerId))
}

func (s *Service) ResizePty(ctx context.Context, req *agent.ResizePtyRequest) (*emptypb.Empty, error) {
	_, p, err := s.process(req.ContainerId, req.ExecId)
	if err != nil {
		return empty(err)
	}
	return empty(p.Resize(req.Width, req.Height))
}

func (s *Service) CloseStdin(ctx context.Context, req *agent.CloseStdinRequest) (*emptypb.Empty, error) {
	_, p, err := s.process(req.ContainerId, req.ExecId)
	if err != nil {
		return empty(err)
	}
	return empty(p.CloseStdin())
}

func (s *Service) Pids(ctx context.Context, req *agent.PidsRequest) (*agent.PidsResponse, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return nil, toGRPC(err)
	}
	pids, err := c.Pids()
	if err != nil {
		return nil, toGRPC(err)
	}
	resp := &agent.PidsResponse{}
	for _, p := range pids {
		resp.Processes = append(resp.Processes, &agent.ProcessInfo{Pid: uint32(p.Pid), ExecId: p.ExecID})
	}
	return resp, nil
}

func (s *Service) Stats(ctx context.Context, req *agent.StatsRequest) (*agent.StatsResponse, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return nil, toGRPC(err)
	}
	m, err := c.Stats()
	if err != nil {
		return nil, toGRPC(err)
	}
	return &agent.StatsResponse{Metrics: m}, nil
}

func (s *Service) UpdateResources(ctx context.Context, req *agent.UpdateResourcesRequest) (*emptypb.Empty, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return empty(err)
	}
	return empty(c.Update(req.Resources))
}

func (s *Service) Pause(ctx context.Context, req *agent.PauseRequest) (*emptypb.Empty, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return empty(err)
	}
	return empty(c.Pause())
}

func (s *Service) Resume(ctx context.Context, req *agent.ResumeRequest) (*emptypb.Empty, error) {
	c, err := s.containers.Get(req.ContainerId)
	if err != nil {
		return empty(err)
	}
	return empty(c.Resume())
}

func (s *Service) WaitEvents(ctx context.Context, _ *agent.WaitEventsRequest) (*agent.WaitEventsResponse, error) {
	evs, err := s.events.wait(ctx)
	if err != nil {
		return nil, toGRPC(err)
	}
	return &agent.WaitEventsResponse{Events: evs}, nil
}

// shutdownTimeout bounds how long Shutdown waits for containers to die.
const shutdownTimeout = 5 * time.Second

// powerOffDelay lets the Shutdown reply reach the host before the power goes.
const powerOffDelay = 100 * time.Millisecond

func (s *Service) PrepareShares(ctx context.Context, req *agent.PrepareSharesRequest) (*emptypb.Empty, error) {
	return empty(s.containers.PrepareShares(ctx, req.Tags))
}

func (s *Service) Shutdown(ctx context.Context, _ *emptypb.Empty) (*emptypb.Empty, error) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	s.containers.Shutdown(sctx)
	cancel()
	if s.powerOff != nil {
		time.AfterFunc(powerOffDelay, s.powerOff)
	}
	return &emptypb.Empty{}, nil
}
