#!/bin/sh
# The way of ../shared/hypervisors-seed.txt, timed: an sshd on the host, the server's SSH
# key copied with root's password (sshpass + ssh-copy-id), libvirtd checked over ssh, then
# the first `virsh -c qemu+ssh://` connection; then one more connection open.
#
# Run by bench/joinbench.py as: unshare -m --propagation private sh oldway.sh SERVERNS HOSTNS ADDR SOCKET WORK
# Everything secret lives in this private mount namespace only: a tmpfs holds the
# throwaway password, the /etc/shadow that sshd reads (bind-mounted over the real one
# here only) and /root (so authorized_keys and the client key never reach the disk).
# Prints "step seconds" lines.
set -eu
srv=$1 ns=$2 addr=$3 socket=$4 work=$5
secret=$work/secret
mkdir -p "$secret"
mount -t tmpfs -o mode=0700 tmpfs "$secret"
mount -t tmpfs -o mode=0700 tmpfs /root

password=$(head -c 18 /dev/urandom | base64)
printf '%s' "$password" >"$secret/password"
hash=$(printf '%s' "$password" | openssl passwd -6 -stdin)
sed "s|^root:[^:]*:|root:$hash:|" /etc/shadow >"$secret/shadow"
chmod 0640 "$secret/shadow"
mount --bind "$secret/shadow" /etc/shadow

cat >"$secret/sshd_config" <<EOF
ListenAddress $addr
PermitRootLogin yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
PidFile $secret/sshd.pid
HostKey $secret/host_key
Subsystem sftp internal-sftp
EOF
ssh-keygen -q -t ed25519 -N '' -f "$secret/host_key"
mkdir -p /run/sshd
ip netns exec "$ns" /usr/sbin/sshd -f "$secret/sshd_config"
trap 'kill $(cat "$secret/sshd.pid") 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    ip netns exec "$ns" ss -Hltn "sport = :22" | grep -q . && break
    sleep 0.05
done

now() { date +%s.%N; }
step() { awk "BEGIN { print \"$1\", $(now) - $2 }"; }
on_server() { ip netns exec "$srv" "$@"; }
uri="qemu+ssh://root@$addr/system?socket=$socket&proxy=netcat&no_tty=1"

start=$(now)
# The server's key, and the host's key in known_hosts (the manual's ssh-keyscan).
mkdir -m 0700 /root/.ssh
ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519
on_server ssh-keyscan -t ed25519 "$addr" 2>/dev/null >/root/.ssh/known_hosts
on_server sshpass -f "$secret/password" ssh-copy-id -i /root/.ssh/id_ed25519.pub "root@$addr" \
    >/dev/null 2>&1
on_server ssh -o BatchMode=yes "root@$addr" "test -S $socket" # libvirtd answers on the host
on_server virsh -c "$uri" version >/dev/null
step added "$start"
# One more connection open (only the open: the interpreter starts before the clock).
on_server /usr/bin/python3 -c "import libvirt, sys, time
t = time.perf_counter(); c = libvirt.open(sys.argv[1]); print('open', time.perf_counter() - t)" "$uri"
