# shellcheck shell=bash
# Environment shared by every anita Slurm job (sourced by the *.sbatch scripts; not submitted itself).
# Offline-safe and cluster-friendly: Hugging Face cache on shared storage, offline mode once the cache is warm,
# no token ever echoed, logs next to the run.
#
# Variables (export them before `sbatch`/`slurm/submit.sh`, or let the defaults apply):
#   ANITA_REPO    repository checkout the jobs run in (default: the submit directory)
#   ANITA_VENV    virtual environment to activate (default: $ANITA_REPO/.venv when present)
#   HF_HOME       Hugging Face cache (default: $ANITA_REPO/.cache/huggingface); put it on shared storage
#   ANITA_OFFLINE auto (default: offline when $HF_HOME/hub already holds models), 1 (always), 0 (never)
#   RECIPE RUN ROOT  the recipe, run name and runs folder (defaults: tiny, demo, runs)

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
export HF_HOME=${HF_HOME:-$ANITA_REPO/.cache/huggingface}
export ANITA_CACHE=${ANITA_CACHE:-$HF_HOME/../anita}
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
case "${ANITA_OFFLINE:-auto}" in
    1) offline=1 ;;
    0) offline=0 ;;
    *) if compgen -G "$HF_HOME/hub/models--*" > /dev/null; then offline=1; else offline=0; fi ;;
esac
if [ "$offline" = 1 ]; then
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi
# A token (HF_TOKEN) may be set for gated models: it stays in the environment, is never printed nor passed to a notebook.
set +x
anita_log_dir="$ROOT/$RUN/logs"
mkdir -p "$anita_log_dir"
echo "anita: job ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on $(hostname) recipe=$RECIPE run=$RUN" \
     "offline=$offline HF_HOME=$HF_HOME token=$([ -n "${HF_TOKEN:-}" ] && echo set || echo unset)"
