package service

// shareFSType is the filesystem the agent mounts a vm.Share with:
// Virtualization.framework exports shares as virtiofs devices, the tag
// being the mount source.
const shareFSType = "virtiofs"

// shareFSOptions are the mount options of every share: virtiofs needs none
// (the 9p transport options would make the mount fail).
var shareFSOptions []string
