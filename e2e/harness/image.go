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
// plus a fixed pseudo-random seed file that output-integrity tests stream and the few programs busybox
// lacks (ipcmk, ipcs, ipcrm, pgrep: tools.go).

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
	return BuildImage(w, Image{Name: name})
}

// Image describes a test image built on the busybox layer: the CRI tests need a pause image and
// critest a dozen small images that differ only in their config (user, entrypoint) or an extra file.
type Image struct {
	// Name is the image reference recorded in the layout's index.
	Name string
	// Entrypoint, Cmd, User, WorkingDir and Env (added after PATH) go into the image config;
	// Cmd defaults to ["sh"].
	Entrypoint, Cmd []string
	User            string
	WorkingDir      string
	Env             []string
	// Files are written in a second layer, over the busybox layer (parents are created).
	Files []File
}

// File is one regular file of an Image's extra layer.
type File struct {
	Path string
	// Mode defaults to 0644; setuid and setgid bits are kept.
	Mode int64
	Data []byte
	// Tool, when set, makes the file a copy of the e2etools binary (Data is ignored): Path's base name
	// picks the program it runs as (tools.go).
	Tool bool
}

// BuildImage writes an OCI image-layout tar of img to w.
func BuildImage(w io.Writer, img Image) error {
	name := img.Name
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return fmt.Errorf("reading busybox (apt-get install busybox-static): %w", err)
	}
	applets, err := busyboxApplets()
	if err != nil {
		return err
	}
	tools, err := e2eTools()
	if err != nil {
		return err
	}
	base, err := busyboxLayer(bb, applets, tools)
	if err != nil {
		return err
	}
	layers := [][]byte{base}
	if len(img.Files) > 0 {
		extra, err := filesLayer(img.Files, tools)
		if err != nil {
			return err
		}
		layers = append(layers, extra)
	}
	var diffIDs []string
	var layerDescs []map[string]any
	for _, l := range layers {
		diffIDs = append(diffIDs, digestOf(l))
		layerDescs = append(layerDescs, map[string]any{
			"mediaType": "application/vnd.oci.image.layer.v1.tar",
			"digest":    digestOf(l),
			"size":      len(l),
		})
	}
	cmd := img.Cmd
	if cmd == nil && img.Entrypoint == nil {
		cmd = []string{"sh"}
	}
	cfg := map[string]any{
		"Env": append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, img.Env...),
		"Cmd": cmd,
	}
	if img.Entrypoint != nil {
		cfg["Entrypoint"] = img.Entrypoint
	}
	if img.User != "" {
		cfg["User"] = img.User
	}
	if img.WorkingDir != "" {
		cfg["WorkingDir"] = img.WorkingDir
	}

	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
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
		"layers": layerDescs,
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
		{blobPath(config), config},
		{blobPath(manifest), manifest},
	}
	for _, l := range layers {
		files = append(files, struct {
			name string
			data []byte
		}{blobPath(l), l})
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

// busyboxLayer builds the image's base layer, an uncompressed tar: busybox and its applets in /bin, the
// e2etools programs in /usr/bin (see tools.go).
func busyboxLayer(bb []byte, applets []string, tools []byte) ([]byte, error) {
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
	if err := file(toolsPath, 0o755, tools); err != nil {
		return nil, err
	}
	for _, n := range ToolNames {
		hdr := &tar.Header{Typeflag: tar.TypeLink, Name: path.Join("usr/bin", n), Linkname: toolsPath, Mode: 0o755, ModTime: mtime}
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

// filesLayer builds a layer holding files (and their parent directories), as an uncompressed tar.
func filesLayer(files []File, tools []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	dirs := map[string]bool{}
	for _, f := range files {
		p := strings.TrimPrefix(path.Clean("/"+f.Path), "/")
		var parents []string
		for d := path.Dir(p); d != "." && !dirs[d]; d = path.Dir(d) {
			parents = append([]string{d}, parents...)
			dirs[d] = true
		}
		for _, d := range parents {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: mtime}); err != nil {
				return nil, err
			}
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
		}
		data := f.Data
		if f.Tool {
			data = tools
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data)), ModTime: mtime}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
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
