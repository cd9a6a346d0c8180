#!/bin/bash
# Slurm epilog: the job's GPU energy (kWh, from the GPUs' energy counters in the
# dcenergy store) into its AdminComment, as "dcenergy:gpu_kwh=<kWh>,gpus=<n>".
#
#   slurm.conf:  EpilogSlurmctld=/etc/slurm/dcenergy-epilog.sh   (once per job, on the controller)
#           or:  Epilog=/etc/slurm/dcenergy-epilog.sh            (every node; acts on the first)
#
# It runs `dcenergy job-energy $SLURM_JOB_ID`, which reads the job's start and end
# from Slurm, its GPUs and their energy counters from the store (DCENERGY_CONFIG or
# /etc/dcenergy/dcenergy.toml), and writes the comment: `scontrol update` while
# slurmctld still accepts it, else `sacctmgr` (slurmdbd) — Slurm refuses an
# AdminComment through scontrol once the job has finished, which it has by the time
# an epilog runs. See docs/slurm.md.
#
# Never fails the epilog (a failing Epilog drains the node): the outcome goes to
# syslog (tag dcenergy-epilog) and, if set, to $DCENERGY_EPILOG_LOG.
# Settings (environment, or /etc/default/dcenergy-epilog): DCENERGY (the command),
# DCENERGY_CONFIG, DCENERGY_EPILOG_LOG, DCENERGY_EPILOG_TIMEOUT (s, default 30).

[ -r /etc/default/dcenergy-epilog ] && . /etc/default/dcenergy-epilog
export PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin:${PATH:-}"
DCENERGY="${DCENERGY:-dcenergy}"
LOG="${DCENERGY_EPILOG_LOG:-}"
LIMIT_S="${DCENERGY_EPILOG_TIMEOUT:-30}"
# dcenergy refuses DCENERGY_* variables that are not its own (a typo would go unseen)
unset DCENERGY_EPILOG_LOG DCENERGY_EPILOG_TIMEOUT
JOB="${SLURM_JOB_ID:-}"
[ -n "$JOB" ] || exit 0

if [ "${SLURM_SCRIPT_CONTEXT:-}" = "epilog_slurmd" ] && [ -n "${SLURM_NODELIST:-}" ]; then
  first="$(scontrol show hostnames "$SLURM_NODELIST" 2>/dev/null | head -n 1)"
  if [ -n "$first" ] && [ "$first" != "${SLURMD_NODENAME:-}" ]; then
    exit 0  # the job's first node writes it, once
  fi
fi

out="$(timeout "$LIMIT_S" $DCENERGY job-energy "$JOB" 2>&1)"
rc=$?
msg="job $JOB: $(printf '%s' "$out" | tr '\n' ' ') (exit $rc)"
if [ -n "$LOG" ]; then
  printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$msg" >> "$LOG" 2>/dev/null
fi
command -v logger >/dev/null 2>&1 && logger -t dcenergy-epilog -- "$msg"
exit 0
