#!/usr/bin/env bash
# Bring up a single-node Slurm on this machine, as root, for tests/slurm (make test-slurm).
#
#   bash tests/slurm/up.sh        # install (apt-get) if needed, write the config, start the daemons
#   bash tests/slurm/down.sh      # stop them
#
# Debian's slurm-wlm and munge; one node (this machine) in one partition `debug`, without
# accounting (so `sacct` fails, as on many small clusters), without cgroups
# (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none) and with more CPUs than the machine
# has (SlurmdParameters=config_overrides), so that two 2-rank cells run side by side on 2 cores.
# A machine that already has a slurm.conf not written by this script is left alone.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "tests/slurm/up.sh: run as root (it installs packages and starts daemons)" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

CONF=/etc/slurm/slurm.conf
MARK="# written by ibridge tests/slurm/up.sh"
STATE=/var/spool/ibridge-slurm
NODE=$(hostname -s)
CPUS=${IBRIDGE_SLURM_CPUS:-8}
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    echo "tests/slurm/up.sh: $CONF exists and was not written here; using that cluster as it is" >&2
else
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm
    cat >"$CONF" <<CONF
$MARK
ClusterName=ibridge-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
# Schedule at once (the defaults, 60 s and 30 s, would add a minute to each test job).
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
fi

# munge: the key usually comes with the package; the daemon runs as its own user.
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [[ ! -f /etc/munge/munge.key ]]; then
    mungekey --create 2>/dev/null || create-munge-key -f
    chown munge:munge /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "tests/slurm/up.sh: the node did not become idle in 60 s; see /var/log/slurm/" >&2
sinfo -N -l >&2 || true
exit 1
