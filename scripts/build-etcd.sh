#!/bin/sh
# Build etcd, etcdctl and etcdutl of an etcd release from etcd's own Go modules, for the
# tests that run that release (bot/testing/versions.py finds them):
#
#   sh scripts/build-etcd.sh [VERSION...]   # no VERSION: every release pinned in scripts/etcd-versions
#
# The binaries go to ${XDG_CACHE_HOME:-$HOME/.cache}/etcd-chatops/etcd-VERSION/. When they are
# there and report VERSION, it says so in one line and does nothing else.
#
# Why a module of our own: etcd's modules carry `replace` directives (to sibling directories of
# etcd's repository), so `go install go.etcd.io/etcd/server/v3@vX` refuses them. A throw-away main
# module (in a temporary directory) requiring server, etcdctl and etcdutl at VERSION builds, since
# a dependency's replaces are ignored. Its three main packages are etcd's own main packages of that
# release (main.go, and etcdutl's ctl.go, copied from the module cache), so each binary has exactly
# that release's commands: etcdutl's differ between 3.5 (backup, check) and 3.6 (hashkv, migrate),
# etcdctl 3.5 still honours ETCDCTL_API=2. The version they report is a constant of
# go.etcd.io/etcd/api/v3/version of that release; only the git SHA, set by etcd's own build
# script, reads "Not provided".
#
# Go missing: one line, exit 0 (the tests that need these versions fail, saying so), but exit 1
# under CI=true, where Go is part of the machine. A failed build always fails.
set -eu

say() { printf 'build-etcd: %s\n' "$*"; }
here=$(cd "$(dirname "$0")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/etcd-chatops

pinned() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/etcd-versions"; }

reports() {  # reports DIR VERSION: each binary in DIR runs and reports VERSION
    "$1/etcd" --version 2>/dev/null | grep -qx "etcd Version: $2" &&
        "$1/etcdctl" version 2>/dev/null | grep -qx "etcdctl version: $2" &&
        "$1/etcdutl" version 2>/dev/null | grep -qx "etcdutl version: $2"
}

build() {  # build VERSION
    version=${1#v}
    case "$version" in
        [0-9]*.[0-9]*.[0-9]*) ;;
        *) say "not a release version: '$1' (usage: build-etcd.sh [VERSION...], e.g. 3.6.17)"; exit 2 ;;
    esac
    dest=$cache/etcd-$version
    if reports "$dest" "$version"; then
        say "etcd $version ready in $dest"
        return 0
    fi
    started=$(date +%s)
    work=$(mktemp -d "${TMPDIR:-/tmp}/build-etcd-$version.XXXXXX")
    log=$work/build.log
    (
        cd "$work"
        export GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod"
        go mod init etcd-chatops.invalid/build-etcd
        go get "go.etcd.io/etcd/server/v3@v$version" "go.etcd.io/etcd/etcdctl/v3@v$version" \
            "go.etcd.io/etcd/etcdutl/v3@v$version"
        for name in server:etcd etcdctl:etcdctl etcdutl:etcdutl; do
            src=$(go list -m -f '{{.Dir}}' "go.etcd.io/etcd/${name%%:*}/v3")
            mkdir -p "cmd/${name#*:}"
            for f in "$src"/*.go; do
                case "$f" in *_test.go) ;; *) cp "$f" "cmd/${name#*:}/" ;; esac
            done
        done
        mkdir out
        go build -trimpath -o out/ ./cmd/...
    ) >"$log" 2>&1 || {
        say "building etcd $version failed; the end of the log:"
        tail -n 15 "$log" | sed 's/^/    /'
        chmod -R u+w "$work"; rm -rf "$work"
        exit 1
    }
    if ! reports "$work/out" "$version"; then
        say "built etcd $version, but the binaries do not report $version:" \
            "$("$work/out/etcd" --version 2>&1 | head -n 1)"
        chmod -R u+w "$work"; rm -rf "$work"
        exit 1
    fi
    # Into place in one rename, so a concurrent build or a reader never sees half a directory.
    mkdir -p "$cache"
    rm -rf "$dest"
    mv -T "$work/out" "$dest" 2>/dev/null || reports "$dest" "$version"
    chmod -R u+w "$work"; rm -rf "$work"
    say "built etcd $version in $(( $(date +%s) - started )) s into $dest"
}

versions=${*:-$(pinned)}
if ! command -v go >/dev/null 2>&1; then
    if [ "${CI:-}" = true ]; then
        say "no \`go\` on PATH: cannot build etcd $(echo $versions) from etcd's Go modules (CI needs Go)"
        exit 1
    fi
    say "no \`go\` on PATH: etcd $(echo $versions) not built; the tests that run these versions will fail"
    exit 0
fi
for v in $versions; do
    build "$v"
done
