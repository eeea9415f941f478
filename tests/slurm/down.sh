#!/usr/bin/env bash
# Stop the daemons tests/slurm/up.sh started (slurmd, slurmctld, munged); leave other Slurms alone.
set -uo pipefail
STATE=/var/spool/ibridge-slurm
if ! grep -qF "# written by ibridge tests/slurm/up.sh" /etc/slurm/slurm.conf 2>/dev/null; then
    echo "tests/slurm/down.sh: /etc/slurm/slurm.conf is not ours; nothing stopped" >&2
    exit 0
fi
scancel --user root 2>/dev/null || true
for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null
done
if [[ -f /run/munge/munged.pid ]]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null
fi
sleep 1
echo "tests/slurm/down.sh: stopped"
