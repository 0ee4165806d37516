#!/bin/bash
# Submit a whole recipe to Slurm as a chain of jobs, one per step, each starting when the previous one succeeded
# (--dependency=afterok), then a report job. Prints "<step> <job id>" per job.
#   slurm/submit.sh [RECIPE [RUN]]            e.g. slurm/submit.sh paper paper
# Per-step resources come from the recipe's `slurm:` values (anita-run --recipe R --list shows them): `nodes` > 1 uses
# train_multinode.sbatch (srun + accelerate launch), a step with `shards` becomes an array job (eval_array.sbatch),
# the others use step.sbatch. Environment:
#   PARTITION ACCOUNT QOS TIME GPUS   override the recipe's values for every job (or use sbatch's SBATCH_* variables)
#   ROOT (runs)  ANITA_ARGS (extra anita-run options, e.g. "--set sft.max_steps=20")  SBATCH_EXTRA (extra sbatch options)
#   HF_HOME ANITA_VENV ANITA_OFFLINE   see slurm/env.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export ANITA_REPO=${ANITA_REPO:-$(dirname "$here")}
export RECIPE=${1:-${RECIPE:-tiny}} RUN=${2:-${RUN:-demo}} ROOT=${ROOT:-runs}
cd "$ANITA_REPO"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    for py in "${ANITA_VENV:-/nonexistent}/bin/python" "$ANITA_REPO/.venv/bin/python"; do
        if [ -x "$py" ]; then PYTHON=$py; break; fi
    done
fi
steps=$("$PYTHON" -m anita.pipeline --recipe "$RECIPE" --list)
logs="$ROOT/$RUN/logs"
mkdir -p "$logs"

common=(--parsable --requeue)
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")
[ -n "${QOS:-}" ] && common+=(--qos="$QOS")
read -r -a sbatch_extra <<< "${SBATCH_EXTRA:-}"

prev=""
ids=()
while IFS=$'\t' read -r -a f; do
    [ "${#f[@]}" -ge 4 ] || continue
    name=${f[0]} nshards=${f[3]} nodes=1 opts=()
    for kv in "${f[@]:4}"; do
        k=${kv%%=*} v=${kv#*=}
        case "$k" in
            gpus) [ -n "${GPUS:-}" ] || opts+=(--gpus-per-node="$v") ;;
            time) [ -n "${TIME:-}" ] || opts+=(--time="$v") ;;
            cpus) opts+=(--cpus-per-task="$v") ;;
            nodes) nodes=$v; opts+=(--nodes="$v") ;;
            partition) [ -n "${PARTITION:-}" ] || opts+=("--partition=$v") ;;
            account) [ -n "${ACCOUNT:-}" ] || opts+=("--account=$v") ;;
            qos) [ -n "${QOS:-}" ] || opts+=("--qos=$v") ;;
            *) opts+=("--$k=$v") ;;
        esac
    done
    [ -n "${TIME:-}" ] && opts+=(--time="$TIME")
    [ -n "${GPUS:-}" ] && opts+=(--gpus-per-node="$GPUS")
    if [ "$nshards" -gt 0 ]; then
        script=eval_array.sbatch; opts+=(--array="0-$((nshards - 1))"); out="$logs/slurm-%x-%A_%a.out"
    elif [ "$nodes" -gt 1 ]; then
        script=train_multinode.sbatch; out="$logs/slurm-%x-%j.out"
    else
        script=step.sbatch; out="$logs/slurm-%x-%j.out"
    fi
    dep=()
    [ -n "$prev" ] && dep=(--dependency="afterok:$prev")
    jid=$(STEP="$name" sbatch "${common[@]}" "${opts[@]}" ${dep[@]+"${dep[@]}"} ${sbatch_extra[@]+"${sbatch_extra[@]}"} \
          --job-name="anita-$RUN-$name" --output="$out" "$here/$script")
    jid=${jid%%;*}
    echo "$name $jid"
    prev=$jid
    ids+=("$jid")
done <<< "$steps"
[ -n "$prev" ] || { echo "submit.sh: recipe $RECIPE has no steps" >&2; exit 2; }
# the report runs whatever happened (afterany), so a failed chain still gets a report saying which step failed
jid=$(sbatch "${common[@]}" ${sbatch_extra[@]+"${sbatch_extra[@]}"} --dependency="afterany:$prev" \
      --job-name="anita-$RUN-report" --output="$logs/slurm-%x-%j.out" "$here/report.sbatch")
jid=${jid%%;*}
echo "report $jid"
echo "submitted ${#ids[@]} steps + report for recipe $RECIPE, run $RUN: ${ids[*]} $jid (squeue -u \$USER; logs in $logs)"
