#!/bin/bash
# One node's task of slurm/2x8.sbatch: `accelerate launch` (torchrun) of this node's ranks, arguments passed
# on to train_vit.py.
#
# A preemption stop reaches this script, the launcher and every rank together (scancel --signal=TERM on the
# step). The ranks save and exit 75, and torchrun then exits 1 (it re-raises the signal). This script exits
# 0 in that case, so srun's --kill-on-bad-exit does not cut short another node that is still saving; the
# batch script decides what to do from the checkpoint on disk. Any other failure keeps its status.
set -uo pipefail
stopped=0
trap 'stopped=1' TERM USR1
accelerate launch --config_file "$ACCELERATE_CONFIG" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$MAIN_NODE" --main_process_port "$MAIN_PORT" train_vit.py "$@" &
launcher=$!
wait $launcher; rc=$?
while kill -0 $launcher 2>/dev/null; do wait $launcher; rc=$?; done  # the trap ends a wait early
echo "node $SLURM_NODEID ($(hostname -s)): launcher exited $rc$([ $stopped = 1 ] && echo ' after a stop signal')"
if [ "$stopped" = 1 ]; then exit 0; fi
exit $rc
