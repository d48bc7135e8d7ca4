#!/bin/sh
# Install OpenSSH's server (Debian's openssh-server: /usr/sbin/sshd) for the ssh launcher's
# tests, which start their own sshd on each host of the multi-host bed, on that host's address
# with its own host key and configuration (tests/test_ssh_launcher.py).
#
#   sh scripts/install-sshd.sh        # from `make test`; safe to run again
#
# Never fails the build: where it cannot install (not root, no apt-get, no package offered) it
# says why and exits 0; the ssh launcher's tests then fail with that reason (they are not
# skipped). The package must not leave a server running or listening on this machine: a
# policy-rc.d answering 101 ("action forbidden") is in place during the install, systemd's units
# are disabled and stopped where systemd runs, and any sshd that appeared during the install is
# ended.
set -eu

say() { printf 'install-sshd: %s\n' "$*"; }
SSHD=/usr/sbin/sshd

ready() { [ -x "$SSHD" ]; }

report() {
    say "ready: $("$SSHD" -V 2>&1 | head -n 1)"
}

if ready; then
    report
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root: cannot install openssh-server (the ssh launcher's tests will fail: no $SSHD)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
    say "no apt-get here: cannot install openssh-server (the ssh launcher's tests will fail: no $SSHD)"
    exit 0
fi

. "$(dirname "$0")/apt-lib.sh"
lists_for openssh-server
version=$(candidate openssh-server)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    say "this system's package sources offer no openssh-server: nothing installed" \
        "(the ssh launcher's tests will fail: no $SSHD)"
    exit 0
fi

before=$(pids_of "$SSHD" | tr '\n' ' ')
forbid_service_starts install-sshd.sh

say "installing openssh-server $version from Debian"
log=$(mktemp /tmp/install-sshd.XXXXXX)
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >"$log" 2>&1; then
    say "apt-get install failed (the ssh launcher's tests will fail):"
    tail -n 5 "$log" | sed 's/^/    /'
fi
rm -f "$log"

# A systemd host would start the server on boot (or now, had policy-rc.d been ignored): the tests
# start their own, in the bed's namespaces only.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
fi
end_started "$before" "$SSHD"

if ready; then
    report
else
    say "installed, but there is no $SSHD (the ssh launcher's tests will fail)"
fi
exit 0
