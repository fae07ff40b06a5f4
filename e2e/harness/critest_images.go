package harness

import "runtime"

// The images cri-tools' critest (v1.34.0) pulls, rebuilt locally on the busybox layer: the machines reach
// no public registry, so a local registry serves them under their original names (containerd mirrors
// registry.k8s.io and gcr.io to it). Each stand-in keeps what the tests look at: the users and groups
// of the image-user images, the marker file naming each test image, a web server on the port the
// networking tests use, and a process named nginx that records its PID in /var/run/nginx.pid.
//
// One cannot be rebuilt: the digest-pinned test-image-digest@sha256:9700f9a2... names the upstream
// manifest's exact bytes. Its test fails the same way on every runtime (docs/critest.md). nonewprivs:1.3's
// setuid-root program that prints its effective uid is e2etools' nnp.

// TaggedImage is a locally built image and every reference it is pushed under.
type TaggedImage struct {
	Image
	// Refs are the references pushed (Image.Name is ignored).
	Refs []string
}

const (
	criToolsRegistry = "gcr.io/k8s-staging-cri-tools/"
	e2eImages        = "registry.k8s.io/e2e-test-images/"
)

// imagePasswd and imageGroup are busybox:1.37's files plus the users the image-user tests name.
const (
	imagePasswd = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n" +
		"nobody:x:65534:65534:nobody:/home:/bin/false\n"
	imageGroup = "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"
)

// fakeServer stands in for nginx or Apache's httpd: a shell whose process name is name (the kernel
// names a script's process after the script), which records its PID where nginx does, says so on
// stdout (the multi-container log test looks for "httpd") and serves dir on port with busybox httpd
// until it is told to stop. It first re-executes itself with the argument "master process", as nginx
// retitles its main process: the ContainerPID spec waits for that in /proc/1/cmdline.
func fakeServer(name, port, dir string) File {
	return File{Path: "/usr/sbin/" + name, Mode: 0o755, Data: []byte(`#!/bin/sh
[ "$1" = "master process" ] || exec "$0" "master process"
mkdir -p /var/run
echo $$ > /var/run/` + name + `.pid
echo "` + name + ` serving ` + dir + ` on port ` + port + `"
httpd -f -p ` + port + ` -h ` + dir + ` &
trap 'kill $! 2>/dev/null; exit 0' TERM INT QUIT
wait
`)}
}

func webServer(name, port string) Image {
	return Image{
		Cmd: []string{"/usr/sbin/" + name},
		Files: []File{
			fakeServer(name, port, "/usr/share/nginx/html"),
			{Path: "/usr/share/nginx/html/index.html", Data: []byte("<title>Welcome to nginx!</title>\n")},
			{Path: "/etc/passwd", Data: []byte(imagePasswd)},
			{Path: "/etc/group", Data: []byte(imageGroup)},
		},
	}
}

func userImage(user string, files ...File) Image {
	return Image{User: user, Files: append([]File{
		{Path: "/etc/passwd", Data: []byte(imagePasswd)},
		{Path: "/etc/group", Data: []byte(imageGroup)},
	}, files...)}
}

// marker is an image holding the empty file /NAME, as cri-tools' image-test Dockerfile builds them.
func marker(name string) Image {
	return Image{Files: []File{{Path: "/" + name}}}
}

// CritestImages lists the images critest v1.34.0 pulls on Linux, each with the references it is
// pushed under.
func CritestImages() []TaggedImage {
	imgs := []TaggedImage{
		{Image{}, []string{e2eImages + "busybox:1.29-2"}},
		{webServer("nginx", "80"), []string{e2eImages + "nginx:1.14-2"}},
		{webServer("httpd", "80"), []string{e2eImages + "httpd:2.4.39-4"}},
		{webServer("nginx", "12003"), []string{criToolsRegistry + "hostnet-nginx-" + runtime.GOARCH + ":latest"}},
		{userImage("1002"), []string{criToolsRegistry + "test-image-user-uid:latest"}},
		{userImage("www-data"), []string{criToolsRegistry + "test-image-user-username:latest"}},
		{userImage("1003:1004"), []string{criToolsRegistry + "test-image-user-uid-group:latest"}},
		{userImage("www-data:1004"), []string{criToolsRegistry + "test-image-user-username-group:latest"}},
		{Image{User: "1000", Files: []File{
			{Path: "/etc/passwd", Data: []byte(imagePasswd + "default-user:x:1000:1000::/home/default-user:/bin/sh\n")},
			{Path: "/etc/group", Data: []byte(imageGroup + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n")},
		}}, []string{criToolsRegistry + "test-image-predefined-group:latest"}},
		{marker("same-image"), []string{criToolsRegistry + "test-image-tags:1", criToolsRegistry + "test-image-tags:2", criToolsRegistry + "test-image-tags:3"}},
		{marker("test"), []string{criToolsRegistry + "test-image-tag:test"}},
		{Image{Cmd: []string{"/usr/local/bin/nnp"}, Files: []File{{Path: "/usr/local/bin/nnp", Mode: 0o4755, Tool: true}}},
			[]string{e2eImages + "nonewprivs:1.3"}},
		{marker("all"), []string{criToolsRegistry + "test-image-tag:all"}},
	}
	for _, n := range []string{"test-image-1", "test-image-2", "test-image-3", "test-image-latest", "test-image-digest"} {
		imgs = append(imgs, TaggedImage{marker(n), []string{criToolsRegistry + n + ":latest"}})
	}
	return imgs
}
