package harness

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"
)

// The test image is built here rather than pulled: the machines reach no registry. It is Debian's static
// busybox with every applet as a hard link (not a symlink, so masked-path and exec tests see real files),
// plus a fixed pseudo-random seed file that output-integrity tests stream.

const (
	// BusyboxImage is the name the harness imports the test image under.
	BusyboxImage = "docker.io/library/macvm-busybox:e2e"
	// BusyboxPath is Debian's busybox-static binary.
	BusyboxPath = "/bin/busybox"
	// SeedPath is where the image holds SeedSize bytes of deterministic pseudo-random data.
	SeedPath = "/e2e/seed"
	// SeedSize is the size of the seed file.
	SeedSize = 1 << 20
)

// Seed returns the content of SeedPath in the test image. It is generated from a fixed PRNG seed so that
// a test can compute the exact output a container produces from it.
func Seed() []byte {
	r := rand.NewChaCha8([32]byte{'m', 'a', 'c', 'v', 'm'})
	b := make([]byte, SeedSize)
	_, _ = r.Read(b)
	return b
}

// BuildBusyboxImage writes an OCI image-layout tar of the busybox test image to w, named name (the
// io.containerd.image.name annotation that `ctr images import` uses).
func BuildBusyboxImage(w io.Writer, name string) error {
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return fmt.Errorf("reading busybox (apt-get install busybox-static): %w", err)
	}
	applets, err := busyboxApplets()
	if err != nil {
		return err
	}
	layer, err := busyboxLayer(bb, applets)
	if err != nil {
		return err
	}
	layerDigest := digestOf(layer)

	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config": map[string]any{
			"Env": []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"Cmd": []string{"sh"},
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{
			"mediaType": "application/vnd.oci.image.config.v1+json",
			"digest":    digestOf(config),
			"size":      len(config),
		},
		"layers": []map[string]any{{
			"mediaType": "application/vnd.oci.image.layer.v1.tar",
			"digest":    layerDigest,
			"size":      len(layer),
		}},
	})
	if err != nil {
		return err
	}
	tag := name
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		tag = name[i+1:]
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []map[string]any{{
			"mediaType": "application/vnd.oci.image.manifest.v1+json",
			"digest":    digestOf(manifest),
			"size":      len(manifest),
			"platform":  map[string]string{"architecture": runtime.GOARCH, "os": "linux"},
			"annotations": map[string]string{
				"io.containerd.image.name":          name,
				"org.opencontainers.image.ref.name": tag,
			},
		}},
	})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blobPath(layer), layer},
		{blobPath(config), config},
		{blobPath(manifest), manifest},
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755}); err != nil {
			return err
		}
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.data))}); err != nil {
			return err
		}
		if _, err := tw.Write(f.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

// busyboxApplets asks busybox for its applet list (it differs between builds).
func busyboxApplets() ([]string, error) {
	cmd := exec.Command(BusyboxPath, "--list")
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := RunCmd(cmd); err != nil {
		return nil, fmt.Errorf("%s --list: %w", BusyboxPath, err)
	}
	var applets []string
	for _, a := range strings.Fields(out.String()) {
		if a != "busybox" && !strings.Contains(a, "/") {
			applets = append(applets, a)
		}
	}
	sort.Strings(applets)
	return applets, nil
}

// busyboxLayer builds the image's only layer, an uncompressed tar.
func busyboxLayer(bb []byte, applets []string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	dir := func(name string, mode int64) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, ModTime: mtime})
	}
	file := func(name string, mode int64, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: mtime}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"bin", "dev", "e2e", "etc", "proc", "root", "sys", "usr", "usr/bin", "var", "mnt"} {
		if err := dir(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := dir("tmp", 0o1777); err != nil {
		return nil, err
	}
	if err := file("bin/busybox", 0o755, bb); err != nil {
		return nil, err
	}
	for _, a := range applets {
		hdr := &tar.Header{Typeflag: tar.TypeLink, Name: path.Join("bin", a), Linkname: "bin/busybox", Mode: 0o755, ModTime: mtime}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
	}
	for _, f := range []struct {
		name, data string
	}{
		{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
		{"etc/group", "root:x:0:\nnogroup:x:65534:\n"},
		{"etc/hostname", "e2e\n"},
	} {
		if err := file(f.name, 0o644, []byte(f.data)); err != nil {
			return nil, err
		}
	}
	if err := file(strings.TrimPrefix(SeedPath, "/"), 0o644, Seed()); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func blobPath(b []byte) string {
	return "blobs/sha256/" + strings.TrimPrefix(digestOf(b), "sha256:")
}
