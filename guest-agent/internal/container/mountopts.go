package container

import (
	"strings"

	"golang.org/x/sys/unix"
)

// mountOptions is a mount's option list split the way mount(2) wants it.
type mountOptions struct {
	// flags are the MS_* flags for the mount itself.
	flags uintptr
	// propagation are MS_SHARED/MS_SLAVE/MS_PRIVATE/MS_UNBINDABLE (with
	// MS_REC), which need a mount call of their own after the mount.
	propagation uintptr
	// data is what the filesystem parses (e.g. trans=virtio for 9p).
	data string
	// bind is set for bind and rbind; rec for rbind.
	bind, rec bool
}

type flagOpt struct {
	clear bool
	flag  uintptr
}

// flagOptions are the generic options mount(8) turns into MS_* flags; all
// other options go to the filesystem as data.
var flagOptions = map[string]flagOpt{
	"async":         {true, unix.MS_SYNCHRONOUS},
	"atime":         {true, unix.MS_NOATIME},
	"defaults":      {false, 0},
	"dev":           {true, unix.MS_NODEV},
	"diratime":      {true, unix.MS_NODIRATIME},
	"dirsync":       {false, unix.MS_DIRSYNC},
	"exec":          {true, unix.MS_NOEXEC},
	"mand":          {false, unix.MS_MANDLOCK},
	"noatime":       {false, unix.MS_NOATIME},
	"nodev":         {false, unix.MS_NODEV},
	"nodiratime":    {false, unix.MS_NODIRATIME},
	"noexec":        {false, unix.MS_NOEXEC},
	"nomand":        {true, unix.MS_MANDLOCK},
	"norelatime":    {true, unix.MS_RELATIME},
	"nostrictatime": {true, unix.MS_STRICTATIME},
	"nosuid":        {false, unix.MS_NOSUID},
	"relatime":      {false, unix.MS_RELATIME},
	"remount":       {false, unix.MS_REMOUNT},
	"ro":            {false, unix.MS_RDONLY},
	"rw":            {true, unix.MS_RDONLY},
	"strictatime":   {false, unix.MS_STRICTATIME},
	"suid":          {true, unix.MS_NOSUID},
	"sync":          {false, unix.MS_SYNCHRONOUS},
}

var propagationOptions = map[string]uintptr{
	"private":     unix.MS_PRIVATE,
	"rprivate":    unix.MS_PRIVATE | unix.MS_REC,
	"shared":      unix.MS_SHARED,
	"rshared":     unix.MS_SHARED | unix.MS_REC,
	"slave":       unix.MS_SLAVE,
	"rslave":      unix.MS_SLAVE | unix.MS_REC,
	"unbindable":  unix.MS_UNBINDABLE,
	"runbindable": unix.MS_UNBINDABLE | unix.MS_REC,
}

// parseMountOptions splits options into flags, propagation and data.
func parseMountOptions(options []string) mountOptions {
	var m mountOptions
	var data []string
	for _, o := range options {
		if f, ok := flagOptions[o]; ok {
			if f.clear {
				m.flags &^= f.flag
			} else {
				m.flags |= f.flag
			}
			continue
		}
		if p, ok := propagationOptions[o]; ok {
			m.propagation |= p
			continue
		}
		switch o {
		case "bind":
			m.bind = true
			continue
		case "rbind":
			m.bind, m.rec = true, true
			continue
		}
		data = append(data, o)
	}
	m.data = strings.Join(data, ",")
	return m
}
