# Shared by the install-*.sh scripts (sourced, POSIX sh): Debian package lookups, and
# installing a package without letting it start a service.

candidate() {  # candidate PKG: the version apt would install, or "" / "(none)"
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p'
}

lists_for() {  # lists_for PKG: refresh the package lists when they offer no PKG
    if [ -z "$(candidate "$1")" ] || [ "$(candidate "$1")" = "(none)" ]; then
        apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying with the package lists at hand"
    fi
}

forbid_service_starts() {  # forbid_service_starts WHO: a policy-rc.d answering 101 until the script exits
    policy=/usr/sbin/policy-rc.d
    backup=""
    if [ -e "$policy" ]; then  # whatever policy was there comes back at exit
        backup=$(mktemp /tmp/policy-rc.d.XXXXXX)
        cp -p "$policy" "$backup"
    fi
    trap restore_policy EXIT
    trap 'exit 1' INT TERM HUP
    printf '#!/bin/sh\n# %s: no service starts during the install\nexit 101\n' "$1" > "$policy"
    chmod 0755 "$policy"
}

restore_policy() {
    if [ -n "$backup" ]; then
        cp -p "$backup" "$policy"
        rm -f "$backup"
    else
        rm -f "$policy"
    fi
}
