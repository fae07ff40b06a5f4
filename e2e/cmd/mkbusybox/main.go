// Command mkbusybox writes the harness's busybox test image (an OCI image-layout tar built from Debian's
// busybox-static) so that shell scripts such as hack/demo.sh can `ctr images import` the very image the
// e2e tests use, without a registry.
//
// Usage: mkbusybox [-name IMAGE] OUT.tar
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/macvm/macvm/e2e/harness"
)

func main() {
	name := flag.String("name", harness.BusyboxImage, "image name (the io.containerd.image.name annotation)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [-name IMAGE] OUT.tar\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := write(flag.Arg(0), *name); err != nil {
		fmt.Fprintln(os.Stderr, "mkbusybox:", err)
		os.Exit(1)
	}
}

func write(path, name string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := harness.BuildBusyboxImage(f, name); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}
