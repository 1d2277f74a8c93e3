#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for testing the sbatch scripts.
#
#   launch/slurm/local_cluster.sh up     [DIR]   start it (idempotent), print SLURM_CONF
#   launch/slurm/local_cluster.sh status [DIR]   exit 0 when every daemon runs and both nodes are up
#   launch/slurm/local_cluster.sh down   [DIR]   cancel its jobs, stop its daemons by pid
#
# DIR (default $LING_SLURM_DIR, else /tmp/ling-slurm) holds slurm.conf, the controller's
# state, spool directories, logs and pid files; nothing global is written except two
# /etc/hosts lines (node01, node02 -> 127.0.0.1) and the munge key. Clients and jobs find
# the cluster through `export SLURM_CONF=DIR/slurm.conf`, so clusters in different
# directories never collide. Ports: $LING_SLURM_PORT (the controller; the two slurmd use
# the next two), else derived from DIR.
#
# Two slurmd daemons on 127.0.0.1 play node01 and node02 (each with this machine's cores),
# in one partition `cpu` without GPUs. Needs root and Debian's `slurm-wlm` and `munge`
# packages (`apt-get install -y slurm-wlm munge`). `down` leaves munged running: it is the
# machine's authentication daemon and other clusters may use it.
set -euo pipefail

ACTION=${1:-}
DIR=${2:-${LING_SLURM_DIR:-/tmp/ling-slurm}}
NODES=(node01 node02)

die() {
    echo "local_cluster: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 up|down|status [DIR]" >&2
    exit 2
}

[[ -n $ACTION ]] || usage
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

if [[ -n ${LING_SLURM_PORT:-} ]]; then
    PORT=$LING_SLURM_PORT
else
    # A stable port per directory, in 17000-18996, so two clusters rarely pick the same.
    PORT=$((17000 + ($(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 666) * 3))
fi

# The pid in a pid file when that process is alive and runs the named daemon, else nothing.
live_pid() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"; then
        echo "$pid"
    fi
}

daemons_running() {
    [[ -n $(live_pid "$DIR/ctld.pid" slurmctld) ]] || return 1
    local node
    for node in "${NODES[@]}"; do
        [[ -n $(live_pid "$DIR/d-$node.pid" slurmd) ]] || return 1
    done
}

nodes_up() {
    # Both nodes respond (idle, allocated, mixed or completing), none down or not responding.
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE '^node0[12] (idle|alloc|mix|comp)$' <<<"$states") -eq ${#NODES[@]} ]]
}

check_tools() {
    local tool missing=()
    for tool in slurmctld slurmd munged munge unmunge sinfo sbatch scontrol squeue scancel; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        die "missing ${missing[*]}: install Slurm and munge (apt-get install -y slurm-wlm munge)"
    fi
    [[ $(id -u) -eq 0 ]] || die "slurmd must run as root here (SlurmdUser=root); run as root"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    munged --force
    local _
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged started but credentials do not verify; see /var/log/munge/munged.log"
}

add_hosts() {
    local node
    for node in "${NODES[@]}"; do
        grep -qE "^[^#]*[[:space:]]$node([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts
    done
}

write_conf() {
    local host cpus tmp
    host=$(hostname)
    cpus=$(nproc)
    tmp=$CONF.tmp
    cat >"$tmp" <<EOF
# Written by launch/slurm/local_cluster.sh: a two-node test cluster on $host.
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldLogFile=$DIR/ctld.log
SlurmdLogFile=$DIR/d-%n.log
SlurmctldPidFile=$DIR/ctld.pid
SlurmdPidFile=$DIR/d-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
NodeName=node01 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=$cpus RealMemory=10000
NodeName=node02 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=$cpus RealMemory=10000
PartitionName=cpu Nodes=node01,node02 Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$CONF"
    fi
    mkdir -p "$DIR/state" "$DIR/spool-node01" "$DIR/spool-node02"
}

up() {
    check_tools
    start_munge
    add_hosts
    if ! daemons_running; then
        write_conf
        [[ -n $(live_pid "$DIR/ctld.pid" slurmctld) ]] || slurmctld
        local node
        for node in "${NODES[@]}"; do
            [[ -n $(live_pid "$DIR/d-$node.pid" slurmd) ]] || slurmd -N "$node"
        done
    fi
    local _
    for _ in $(seq 120); do
        if nodes_up; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes did not come up within 60 s; see $DIR/ctld.log and $DIR/d-node0*.log"
}

stop_pid() {
    local file=$1 name=$2 pid _
    pid=$(live_pid "$file" "$name")
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    if [[ -n $(live_pid "$DIR/ctld.pid" slurmctld) ]]; then
        local jobs _
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 60); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    local node
    for node in "${NODES[@]}"; do
        stop_pid "$DIR/d-$node.pid" slurmd
    done
    stop_pid "$DIR/ctld.pid" slurmctld
}

status() {
    local ok=0 pid node
    pid=$(live_pid "$DIR/ctld.pid" slurmctld)
    echo "slurmctld: ${pid:-not running}"
    [[ -n $pid ]] || ok=1
    for node in "${NODES[@]}"; do
        pid=$(live_pid "$DIR/d-$node.pid" slurmd)
        echo "slurmd $node: ${pid:-not running}"
        [[ -n $pid ]] || ok=1
    done
    if ((ok == 0)); then
        sinfo -N || ok=1
        nodes_up || ok=1
    fi
    echo "SLURM_CONF=$CONF"
    return $ok
}

case $ACTION in
up) up ;;
down) down ;;
status) status ;;
*) usage ;;
esac
