package service

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/macvm/macvm/pkg/network"
)

// TestMain builds macvm-usernet, which the shim starts for a container
// without a network namespace (most specs of these tests), into a private
// directory: the test binary has no shim directory to find it in.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "service-usernet-")
	if err != nil {
		panic(err)
	}
	network.UserNetHelper = filepath.Join(dir, "macvm-usernet")
	out, err := exec.Command("go", "build", "-o", network.UserNetHelper, "../../cmd/macvm-usernet").CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		panic(fmt.Sprintf("building macvm-usernet: %v\n%s", err, out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
