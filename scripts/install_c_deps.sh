#!/usr/bin/env bash
# Install what examples/c needs (libzmq, msgpack-c, pkg-config, a C compiler, make) from Debian/Ubuntu
# packages, only those missing. Idempotent and quiet. It never fails the caller: when it cannot
# install (no apt-get, not root, no network), it says why on stderr and exits 0, and the C client
# test then skips with its own reason.
set -u

say() { echo "install_c_deps: $*" >&2; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# A package apt knows and could install (has a candidate version).
available() { apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'; }

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    say "no dpkg/apt-get here (not Debian or Ubuntu); install libzmq, msgpack-c and pkg-config yourself"
    exit 0
fi

# msgpack-c is libmsgpack-dev up to Debian 12 / Ubuntu 24.04, libmsgpack-c-dev afterwards.
msgpack_pkgs=(libmsgpack-dev libmsgpack-c-dev)
wanted=(libzmq3-dev pkg-config)
command -v cc >/dev/null 2>&1 || wanted+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || wanted+=(make)

missing=()
for pkg in "${wanted[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ! installed "${msgpack_pkgs[0]}" && ! installed "${msgpack_pkgs[1]}"; then
    missing+=("${msgpack_pkgs[0]}")  # the name apt has is chosen below, once its lists are fresh
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    say "missing ${missing[*]} and not root (and no password-less sudo); not installing"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! log=$(${sudo[@]+"${sudo[@]}"} apt-get update -qq 2>&1); then
    say "apt-get update failed (no network?); not installing ${missing[*]}:"
    printf '%s\n' "$log" | tail -n 3 >&2
    exit 0
fi

packages=()
for pkg in "${missing[@]}"; do
    if [ "$pkg" = "${msgpack_pkgs[0]}" ] && ! available "$pkg"; then
        if ! available "${msgpack_pkgs[1]}"; then
            say "apt knows neither ${msgpack_pkgs[*]}; install msgpack-c yourself"
            continue
        fi
        pkg=${msgpack_pkgs[1]}
    fi
    packages+=("$pkg")
done
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi

if ! log=$(${sudo[@]+"${sudo[@]}"} apt-get install -y -qq --no-install-recommends "${packages[@]}" 2>&1); then
    say "apt-get install ${packages[*]} failed:"
    printf '%s\n' "$log" | tail -n 5 >&2
    exit 0
fi
say "installed ${packages[*]}"
exit 0
