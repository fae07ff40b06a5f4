package bootimage

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"

	"github.com/containerd/errdefs"
)

func readAll(t *testing.T, r io.Reader) []CPIOEntry {
	t.Helper()
	cr := NewCPIOReader(r)
	var out []CPIOEntry
	for {
		e, err := cr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, *e)
	}
}

func TestCPIORoundTrip(t *testing.T) {
	in := []CPIOEntry{
		{Name: "dev", Mode: modeDir | 0o755},
		{Name: "dev/console", Mode: modeCharDev | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "init", Mode: modeRegular | 0o755, Data: []byte("#!/bin/sh\n")},
		// Sizes around the 4-byte padding boundaries.
		{Name: "a", Mode: modeRegular | 0o644, Data: []byte{}},
		{Name: "bb", Mode: modeRegular | 0o644, Data: []byte{1}},
		{Name: "ccc", Mode: modeRegular | 0o644, Data: []byte{1, 2}},
		{Name: "dddd", Mode: modeRegular | 0o600, UID: 1000, GID: 1000, Mtime: 1700000000, Data: []byte{1, 2, 3}},
		{Name: "lib/link", Mode: modeSymlink | 0o777, Data: []byte("../init")},
		{Name: "big", Mode: modeRegular | 0o644, Data: bytes.Repeat([]byte("0123456789"), 100001)},
	}
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	for _, e := range in {
		if err := w.WriteEntry(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", buf.Len())
	}
	got := readAll(t, bytes.NewReader(buf.Bytes()))
	if len(got) != len(in) {
		t.Fatalf("got %d entries, want %d", len(got), len(in))
	}
	for i := range in {
		if in[i].Data == nil {
			in[i].Data = []byte{}
		}
		if !reflect.DeepEqual(got[i], in[i]) {
			t.Errorf("entry %d: got %+v, want %+v", i, got[i].Name, in[i].Name)
		}
	}
}

func TestCPIOWriterRejects(t *testing.T) {
	w := NewCPIOWriter(io.Discard)
	for _, name := range []string{"", cpioTrailer} {
		if err := w.WriteEntry(CPIOEntry{Name: name, Mode: modeRegular}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("name %q: got %v, want ErrInvalidArgument", name, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteEntry(CPIOEntry{Name: "late", Mode: modeRegular}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("write after close: got %v, want ErrFailedPrecondition", err)
	}
}

func TestCPIOReaderCorrupt(t *testing.T) {
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	if err := w.WriteEntry(CPIOEntry{Name: "f", Mode: modeRegular | 0o644, Data: []byte("hello")}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	good := buf.Bytes()

	badMagic := append([]byte{}, good...)
	badMagic[0] = 'X'
	truncated := good[:newcHeaderSize+4]
	for name, b := range map[string][]byte{"bad magic": badMagic, "truncated": truncated} {
		_, err := NewCPIOReader(bytes.NewReader(b)).Next()
		if !errdefs.IsDataLoss(err) {
			t.Errorf("%s: got %v, want ErrDataLoss", name, err)
		}
	}
}
