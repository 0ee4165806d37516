# shellcheck shell=bash
# Environment shared by every anita Slurm job (sourced by the *.sbatch scripts; not submitted itself).
# Offline-safe and cluster-friendly: the usual Hugging Face cache (put HF_HOME on shared storage), offline once the
# prefetch job has downloaded what the recipe names, no token ever echoed, logs next to the run, and the time-limit
# handler that requeues the job.
#
# Variables (export them before `sbatch`/`slurm/submit.sh`, or let the defaults apply):
#   ANITA_REPO    repository checkout the jobs run in (default: the submit directory; slurm/submit.sh and
#                 `anita-run --slurm` set it to the checkout of the `anita` package they import, which may not be the
#                 folder you are in when the venv's editable install points at another checkout)
#   ANITA_VENV    virtual environment to activate (default: $ANITA_REPO/.venv when present)
#   HF_HOME       Hugging Face cache (default: Hugging Face's own, ~/.cache/huggingface); put it on shared storage
#   ANITA_CACHE   anita's cache (built models; default: ~/.cache/anita, the same as a local run)
#   ANITA_OFFLINE auto (default: offline when ROOT/RUN/prefetch.json says the prefetch completed), 1 (always), 0 (never)
#   RECIPE RUN ROOT  the recipe, run name and runs folder (defaults: tiny, demo, runs; a relative ROOT is taken from
#                 ANITA_REPO, where the job runs: slurm/submit.sh passes an absolute one)
#   ANITA_SETS    `--set` overrides, one STEP.PARAM=VALUE a line;  ANITA_FORCE=1  --force (first run only, not after a requeue)
#   ANITA_ARGS    further anita-run options, split on spaces

ANITA_REPO=${ANITA_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ANITA_REPO" || { echo "anita: cannot cd to ANITA_REPO=$ANITA_REPO" >&2; exit 2; }
export ANITA_REPO
if [ -n "${ANITA_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$ANITA_VENV/bin/activate"
elif [ -f "$ANITA_REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$ANITA_REPO/.venv/bin/activate"
fi

export RECIPE=${RECIPE:-tiny} RUN=${RUN:-demo} ROOT=${ROOT:-runs}
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# as many CPU threads as the job was given: two jobs sharing a node otherwise both spin on every core (without cgroups
# Slurm does not stop them), which on a 2-core node made a CPU training step ~50x slower
_job_cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
if [ -n "$_job_cpus" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$_job_cpus} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$_job_cpus}
fi
case "${ANITA_OFFLINE:-auto}" in
    1) offline=1 ;;
    0) offline=0 ;;
    *) if grep -qs '"status": *"completed"' "$ROOT/$RUN/prefetch.json"; then offline=1; else offline=0; fi ;;
esac
if [ "$offline" = 1 ]; then
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi
# A token (HF_TOKEN) may be set for gated models: it stays in the environment, is never printed nor passed to a notebook.
set +x
anita_log_dir="$ROOT/$RUN/logs"
mkdir -p "$anita_log_dir"
echo "anita: job ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on $(hostname) recipe=$RECIPE run=$RUN" \
     "restarts=${SLURM_RESTART_COUNT:-0} offline=$offline HF_HOME=${HF_HOME:-default} token=$([ -n "${HF_TOKEN:-}" ] && echo set || echo unset)"

# anita-run's options from the environment: ANITA_SETS (one override a line: values may hold spaces), ANITA_FORCE, ANITA_ARGS
anita_extra=()
if [ -n "${ANITA_SETS:-}" ]; then
    while IFS= read -r anita_s; do [ -n "$anita_s" ] && anita_extra+=(--set "$anita_s"); done <<< "$ANITA_SETS"
fi
# a requeued job must resume, not start again: --force only on the first run
if [ "${ANITA_FORCE:-0}" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then anita_extra+=(--force); fi
read -r -a anita_args <<< "${ANITA_ARGS:-}"
anita_extra+=(${anita_args[@]+"${anita_args[@]}"})

# Time limits: the step jobs are submitted with --signal=B:USR1@SECONDS, so Slurm signals this shell shortly before the
# limit. The job then requeues itself: Slurm stops the step (anita-run marks it failed), puts the job back in the queue
# under the same id (the jobs waiting on it keep waiting) and the step resumes from its last checkpoint when it restarts.
anita_requeue() {
    echo "anita: job $SLURM_JOB_ID is near its time limit: requeueing it (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))); the step resumes from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || echo "anita: scontrol requeue $SLURM_JOB_ID failed: resubmit the same command to resume" >&2
}
# run a command (srun ...) in the background so the shell can take the signal, and return its exit status
anita_run() {
    trap anita_requeue USR1
    "$@" &
    local pid=$! rc=0
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break      # a signal interrupted `wait`: the command still runs
    done
    trap - USR1
    return "$rc"
}
