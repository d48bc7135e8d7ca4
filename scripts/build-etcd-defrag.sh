#!/bin/sh
# Build etcd-defrag (github.com/ahrtr/etcd-defrag, the community's rolling defragmentation tool) for
# bench/bench_defrag.py, into ${XDG_CACHE_HOME:-$HOME/.cache}/etcd-chatops/etcd-defrag-VERSION/:
#
#   sh scripts/build-etcd-defrag.sh [VERSION]   # no VERSION: the one pinned in scripts/etcd-defrag-version
#
# When the binary is there and reports VERSION, it says so in one line and does nothing else.
# Its go.mod has no replace directives, so `go install module@version` builds it from the Go module proxy.
# Where the proxy does not serve it (it answers 403 on some networks), ETCD_DEFRAG_SRC names a checkout of
# the repository at that release's tag; the build then uses it, its dependencies still from the proxy.
set -eu

say() { printf 'build-etcd-defrag: %s\n' "$*"; }
here=$(cd "$(dirname "$0")" && pwd)
version=${1:-$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/etcd-defrag-version" | head -n 1)}
version=${version#v}
dest=${XDG_CACHE_HOME:-$HOME/.cache}/etcd-chatops/etcd-defrag-$version

reports() { "$1/etcd-defrag" --version 2>/dev/null | grep -qx "etcd-defrag Version: $version"; }

if reports "$dest"; then
    say "etcd-defrag $version ready in $dest"
    exit 0
fi
command -v go >/dev/null 2>&1 || { say "no \`go\` on PATH: cannot build etcd-defrag $version"; exit 1; }
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/build-etcd-defrag-$version.XXXXXX")
log=$work/build.log
(
    export GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod"
    mkdir "$work/out"
    if [ -n "${ETCD_DEFRAG_SRC:-}" ]; then
        cd "$ETCD_DEFRAG_SRC" && go build -trimpath -o "$work/out/etcd-defrag" .
    else
        GOBIN=$work/out go install -trimpath "github.com/ahrtr/etcd-defrag@v$version"
    fi
) >"$log" 2>&1 || {
    say "building etcd-defrag $version failed; the end of the log:"
    tail -n 15 "$log" | sed 's/^/    /'
    chmod -R u+w "$work"; rm -rf "$work"
    exit 1
}
if ! reports "$work/out"; then
    say "built etcd-defrag, but it does not report $version: $("$work/out/etcd-defrag" --version 2>&1 | head -n 1)"
    chmod -R u+w "$work"; rm -rf "$work"
    exit 1
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv -T "$work/out" "$dest"
chmod -R u+w "$work"; rm -rf "$work"
say "built etcd-defrag $version in $(( $(date +%s) - started )) s into $dest"
