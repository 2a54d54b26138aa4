#!/bin/busybox sh
# /init of the kernel-matrix guest (built by xtask/src/vm/guest.rs): mounts
# what the tests need, loads the modules, runs the test binaries as
# /tests/plan says, prints marker lines for the host to parse
# (xtask/src/vm/console.rs), then powers off.

/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

/bin/busybox --install -s /bin
# The real iproute2 `ip` (in /usr/sbin) first: busybox's applet has no
# netns or veth support.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
# The tests that run the real agent find it here.
export LIMITER_AGENT_BIN=/usr/bin/limiter-agent

# Markers start on a line of their own: kernel messages may end without one.
marker() { printf '\n@@vm-test %s\n' "$*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t bpf bpf /sys/fs/bpf || marker error "mounting bpffs failed"
# `ip netns` keeps its namespaces in /run/netns.
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ip link set lo up

marker kernel "$(uname -r)"
[ -e /sys/kernel/btf/vmlinux ] || marker error "no /sys/kernel/btf/vmlinux"

# Numbered so that dependencies load first.
for module in /modules/*.ko; do
    [ -e "$module" ] || continue
    insmod "$module" || marker error "insmod $module failed"
done

# Runs one test binary, one test at a time, each output line prefixed with
# the binary's name (binaries of one step run side by side).
run() {
    name=$1
    args=
    [ -e "/tests/$name.args" ] && args=$(cat "/tests/$name.args")
    marker start "$name"
    {
        # shellcheck disable=SC2086 # args are words (flags and test names)
        "/tests/$name" --test-threads=1 $args </dev/null 2>&1
        echo "$?" >"/tmp/$name.exit"
    } | sed "s/^/$name| /"
    marker end "$name" exit "$(cat "/tmp/$name.exit")"
}

# One step per line; the binaries of a step run side by side.
while read -r step; do
    for name in $step; do
        run "$name" &
    done
    wait
done </tests/plan

marker done
sync
poweroff -f
