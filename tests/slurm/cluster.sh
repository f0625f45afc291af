#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine for the Slurm tests (needs root).
#   bash tests/slurm/cluster.sh          install if missing, configure, start, wait until the node is idle
#                                        (idempotent: a cluster already running with this configuration is kept)
#   bash tests/slurm/cluster.sh stop     stop the daemons
# Installs Debian's slurmctld slurmd slurm-client munge; writes /etc/slurm/slurm.conf for this host
# with its real CPU count and memory; starts munged, slurmctld and slurmd; waits for `sinfo` to say idle.
set -euo pipefail

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
}
if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

if [ "$(id -u)" != 0 ]; then echo "cluster.sh: needs root (it installs packages and starts daemons)" >&2; exit 2; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the CPUs this machine gives us (nproc honours OMP_*)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
conf=$(mktemp)
cat > "$conf" <<CONF
# Written by bigtrain's tests/slurm/cluster.sh: one node, this host.
ClusterName=bigtrain-test
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# Already running with this configuration and the node up: nothing to do (keeps queued jobs and logs).
if cmp -s "$conf" /etc/slurm/slurm.conf && pgrep -x munged >/dev/null && pgrep -x slurmctld >/dev/null \
   && pgrep -x slurmd >/dev/null; then
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated|completing) rm -f "$conf"; echo "cluster.sh: node ${host} ${state} (already running)"; exit 0 ;;
  esac
fi
mv "$conf" /etc/slurm/slurm.conf
chmod 0644 /etc/slurm/slurm.conf

# munge: its key comes with the package; the daemon refuses to run as root, so run it as munge.
[ -s /etc/munge/munge.key ] || mungekey --create --force 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then runuser -u munge -- /usr/sbin/munged; fi

stop_slurm() { pkill -x slurmd 2>/dev/null || true; pkill -x slurmctld 2>/dev/null || true; }
stop_slurm
sleep 1
slurmctld -c    # -c: clear saved state (jobs of an earlier run)
slurmd
for _ in $(seq 1 60); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated) echo "cluster.sh: node ${host} ${state} · ${cpus} CPUs · ${mem_mb} MB"; exit 0 ;;
    down*|drain*) scontrol update nodename="${host}" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "cluster.sh: the node did not become idle in 60 s (state '${state:-none}'); see /var/log/slurm/*.log" >&2
exit 1
