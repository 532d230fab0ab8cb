# shellcheck shell=bash
# Shared by docker/build-images and docker/build-test-images: a Debian root file system made
# with `debootstrap --variant=minbase` and `docker import`ed. Nothing is pulled from an image
# registry; packages come from the Debian mirror ($PGHERD_DEBIAN_MIRROR).
#
# Source it after defining say and die.

DEBIAN_MIRROR=${PGHERD_DEBIAN_MIRROR:-http://deb.debian.org/debian}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The root file system being built, for image_cleanup (an EXIT trap while it exists).
_image_rootfs=

image_cleanup() {
    local r=$_image_rootfs
    [[ -n $r ]] || return 0
    # A customize step may have mounted /proc in the root file system; never rm through it.
    if mountpoint -q "$r/proc"; then
        umount "$r/proc" || umount -l "$r/proc" || true
    fi
    rm -rf --one-file-system -- "$r" "$r.log"
    _image_rootfs=
}

# Runs a command in the root file system with /proc mounted and no service started by
# package scripts (policy-rc.d), e.g. `in_rootfs "$rootfs" apt-get install -y foo`.
in_rootfs() {
    local rootfs=$1 rc=0
    shift
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 755 "$rootfs/usr/sbin/policy-rc.d"
    mount -t proc proc "$rootfs/proc"
    DEBIAN_FRONTEND=noninteractive LC_ALL=C chroot "$rootfs" "$@" || rc=$?
    umount "$rootfs/proc" || umount -l "$rootfs/proc" || true
    rm -f "$rootfs/usr/sbin/policy-rc.d"
    return "$rc"
}

# debootstrap_image IMAGE SUITE PACKAGES [CUSTOMIZE]
#
# Builds IMAGE from a minbase debootstrap of SUITE with the comma-separated PACKAGES, unless
# IMAGE exists already (`docker rmi IMAGE` forces a rebuild). CUSTOMIZE, if given, is a
# function called with the root file system's path after debootstrap (e.g. to add packages
# from a second suite). The clusters the PostgreSQL packages create (<major>/main) and the apt
# caches are dropped: a container never uses them.
debootstrap_image() {
    local image=$1 suite=$2 packages=$3 customize=${4:-} rootfs
    if image_exists "$image"; then
        say "$image exists; not rebuilding it (docker rmi $image forces a rebuild)"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root: run this script as root once to create $image"
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null ||
            die "apt-get install debootstrap failed"
    fi
    rootfs=$(mktemp -d /var/tmp/pgherd-rootfs.XXXXXX)
    chmod 755 "$rootfs" # apt in a customize step downloads as _apt
    _image_rootfs=$rootfs
    trap image_cleanup EXIT
    say "debootstrap $suite from $DEBIAN_MIRROR into $rootfs for $image (a few minutes)"
    if ! debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$DEBIAN_MIRROR" \
        >"$rootfs.log" 2>&1; then
        tail -n 30 "$rootfs.log" >&2
        cp "$rootfs.log" "/var/tmp/pgherd-debootstrap-$suite.log" 2>/dev/null || true
        die "debootstrap of $suite failed (log kept in /var/tmp/pgherd-debootstrap-$suite.log)"
    fi
    if [[ -n $customize ]]; then
        "$customize" "$rootfs" || die "preparing the $suite root file system for $image failed"
    fi
    rm -rf "$rootfs"/var/lib/postgresql/*/main "$rootfs"/etc/postgresql/*/main \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    say "importing $image"
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        - "$image" >/dev/null || die "docker import of $image failed"
    image_cleanup
    trap - EXIT
}
