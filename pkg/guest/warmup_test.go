package guest

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/macvm/macvm/internal/testutil"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// warmAgent records the calls of a pool warm-up; createErr fails its
// CreateContainer.
type warmAgent struct {
	fakeAgent
	createErr error

	mu    sync.Mutex // guards calls
	calls []string
}

func (a *warmAgent) record(s string) {
	a.mu.Lock()
	a.calls = append(a.calls, s)
	a.mu.Unlock()
}

func (a *warmAgent) Info(context.Context, *emptypb.Empty) (*agent.InfoResponse, error) {
	return &agent.InfoResponse{ModulesLoaded: true}, nil
}

func (a *warmAgent) PrepareShares(_ context.Context, r *agent.PrepareSharesRequest) (*emptypb.Empty, error) {
	a.record("PrepareShares " + strings.Join(r.GetTags(), ","))
	return &emptypb.Empty{}, nil
}

func (a *warmAgent) Reseed(_ context.Context, r *agent.ReseedRequest) (*emptypb.Empty, error) {
	if len(r.GetEntropy()) < 32 {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument)
	}
	a.record("Reseed")
	return &emptypb.Empty{}, nil
}

func (a *warmAgent) SetTime(context.Context, *agent.SetTimeRequest) (*emptypb.Empty, error) {
	a.record("SetTime")
	return &emptypb.Empty{}, nil
}

func (a *warmAgent) CreateContainer(_ context.Context, r *agent.CreateContainerRequest) (*agent.CreateContainerResponse, error) {
	var spec specs.Spec
	if err := json.Unmarshal(r.GetSpec(), &spec); err != nil || spec.Process == nil || len(spec.Mounts) == 0 {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument)
	}
	a.record("CreateContainer " + r.GetContainerId() + " no_spare=" + map[bool]string{true: "1", false: "0"}[r.GetNoSpare()] +
		" rootfs=" + r.GetRootfs()[0].GetType())
	if a.createErr != nil {
		return nil, errgrpc.ToGRPC(a.createErr)
	}
	return &agent.CreateContainerResponse{Pid: 7}, nil
}

func (a *warmAgent) DeleteContainer(_ context.Context, r *agent.DeleteContainerRequest) (*emptypb.Empty, error) {
	a.record("DeleteContainer " + r.GetContainerId())
	return &emptypb.Empty{}, nil
}

// TestPoolWarm: the pool's warm-up mounts the shares, reseeds, sets the
// clock, creates a throw-away container without the spare helper on a
// guest tmpfs and deletes it; a failed create fails the warm-up (the
// daemon discards the VM) and the container is still deleted.
func TestPoolWarm(t *testing.T) {
	want := []string{"PrepareShares shared", "Reseed", "SetTime",
		"CreateContainer " + WarmUpContainerID + " no_spare=1 rootfs=tmpfs", "DeleteContainer " + WarmUpContainerID}
	for _, tc := range []struct {
		name      string
		createErr error
	}{{"ok", nil}, {"create fails", errdefs.ErrUnknown}} {
		t.Run(tc.name, func(t *testing.T) {
			a := &warmAgent{createErr: tc.createErr}
			host, guest := testutil.Socketpair(t)
			stop := startGuestWith(t, guest, a)
			defer stop()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			release, err := PoolWarm(ctx, host, []string{"shared"})
			if tc.createErr == nil {
				if err != nil {
					t.Fatalf("PoolWarm: %v", err)
				}
				release()
			} else if err == nil || !errors.Is(err, tc.createErr) {
				t.Fatalf("PoolWarm with a failing create: %v, want %v", err, tc.createErr)
			}
			a.mu.Lock()
			got := strings.Join(a.calls, "; ")
			a.mu.Unlock()
			if got != strings.Join(want, "; ") {
				t.Errorf("calls:\n got %s\nwant %s", got, strings.Join(want, "; "))
			}
		})
	}
}
