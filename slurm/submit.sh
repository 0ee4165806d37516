#!/bin/bash
# Submit a whole recipe to Slurm as a chain of jobs (the same as `anita-run --recipe RECIPE --run RUN --slurm`):
#   slurm/submit.sh [RECIPE [RUN]] [--root ROOT] [--steps a,b] [--set STEP.PARAM=VALUE]... [--force] [--replace] [--dry-run]
# e.g. PARTITION=gpu ACCOUNT=myproj slurm/submit.sh paper paper
# A prefetch job first when the recipe names Hub models/datasets/lm-eval tasks (it needs the network; the others run
# offline), one job per step, each after the previous one succeeded (afterok, and cancelled when it failed), a step with
# `shards` as an array job, a step with `nodes` > 1 on train_multinode.sbatch, then a report job that runs whatever
# happened and names a failed step. Prints "<job> <job id>" per job. What it checks and refuses first: --steps and
# --set as in a local run, each step's resources against the partition (sinfo), a chain of the same run still queued.
# Environment (see nbs/12_slurm.ipynb):
#   GPUS CPUS TIME MEM PARTITION ACCOUNT QOS   override the recipe's `slurm:` values for every job
#   ROOT (runs, relative to the current folder)  ANITA_SETS (one --set a line)  SBATCH_EXTRA (extra sbatch options)
#   ANITA_SIGNAL_S (120: seconds before the time limit at which a job requeues itself)
#   PREFETCH_PARTITION (where the prefetch job runs)  PREFETCH=0 (no prefetch job: already downloaded)
#   HF_HOME ANITA_VENV ANITA_OFFLINE   see slurm/env.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export ANITA_REPO=${ANITA_REPO:-$(dirname "$here")}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    for py in "${ANITA_VENV:-/nonexistent}/bin/python" "$ANITA_REPO/.venv/bin/python"; do
        if [ -x "$py" ]; then PYTHON=$py; break; fi
    done
fi
exec "$PYTHON" -m anita.slurm submit "$@"
