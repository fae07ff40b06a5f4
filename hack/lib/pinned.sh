# Shared by the hack/build-*.sh scripts that build pinned tools from the Go module proxy into a directory of
# _output/ and skip the build when the pinned version is already there. Source it; it defines:
#
#   pinned_setup DIR       checks the usage (one DIR argument), creates DIR, sets OUTDIR to its absolute path
#                          (go install rejects a relative GOBIN) and puts /usr/local/go/bin on PATH if needed.
#   built_from BIN MODULE VERSION
#                          true when BIN exists and its embedded build info (`go version -m`, exact, unlike
#                          each tool's --version output) names MODULE at VERSION as main module or dependency.

pinned_setup() {
	if [ $# -ne 1 ]; then
		echo "usage: $0 DIR" >&2
		exit 2
	fi
	mkdir -p "$1"
	OUTDIR=$(cd "$1" && pwd)
	if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
		export PATH="$PATH:/usr/local/go/bin"
	fi
}

built_from() {
	[ -x "$1" ] || return 1
	local v
	v=$(go version -m "$1" 2>/dev/null | awk -v m="$2" '($1 == "mod" || $1 == "path" || $1 == "dep") && $2 == m { print $3 }' | head -1)
	[ "$v" = "$3" ]
}
