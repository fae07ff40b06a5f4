package service

// shareFSType is the filesystem the agent mounts a vm.Share with: QEMU
// exports shares over 9p (virtiofsd is not packaged for the Linux hosts).
const shareFSType = "9p"

// shareFSOptions are the mount options of every share.
var shareFSOptions = ninePOptions
