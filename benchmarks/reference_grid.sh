#!/usr/bin/env bash
# The reference robustness grid of docs/benchmarks.md: Fashion-MNIST (Debian's
# dataset-fashion-mnist), 20 clients, Dirichlet alpha=0.5 (stage 11: 0.1), 30 rounds.
#
# Resumable: a finished cell (benchmarks/fmnist-grid/cells/<key>/results.json with status
# "finished") is never run again, so this script can be re-run, or stopped and re-run, at
# will, across sessions. Invocations run in priority order: the 40% column for SoftMerge
# and the two strongest baselines first.
#
#   bash benchmarks/reference_grid.sh            # everything, in order
#   bash benchmarks/reference_grid.sh 1 2        # only stages 1 and 2
#   JOBS=4 bash benchmarks/reference_grid.sh     # four grids at once on one output (softmerge-grid --jobs)
#   bash benchmarks/reference_grid.sh auto       # the softmerge-warm-step = auto variant (not run by default)
#   bash benchmarks/reference_grid.sh open-share # auto with softmerge-merge-step-share = open (not run by default)
set -uo pipefail
cd "$(dirname "$0")/.."
SIM=${SIM:-.venv/bin/softmerge-grid}
OUT=benchmarks/fmnist-grid
COMMON=(--dataset fashion-mnist --clients 20 --rounds 30 --alpha 0.5 --output "$OUT" --jobs "${JOBS:-1}"
        --set client-pool-size=12000 --set local-epochs=1 --set batch-size=32 --set learning-rate=0.05
        --set server-gate-size=300 --set server-test-size=2000)
ATTACKS=none,label-flip,sign-flip,gaussian,scaling,extreme,backdoor,backdoor-replace,layer-stealth,backdoor-evade,alie,ipm-0.1,ipm-100,min-max,min-sum,fang,mimic,mimic-fixed
# Stages 1 and 2 run these three; stage 3 the rest at the same fractions.
OTHERS=fedmedian,fedtrimmedavg,krum,multikrum,bulyan,centered-clipping,geomed

stage() {
  case "$1" in
    1) "$SIM" "${COMMON[@]}" --strategies softmerge,fltrust,fedavg --attacks "$ATTACKS" --fractions 0.4 ;;
    2) "$SIM" "${COMMON[@]}" --strategies softmerge,fltrust,fedavg --attacks "$ATTACKS" --fractions 0.2 ;;
    3) "$SIM" "${COMMON[@]}" --strategies "$OTHERS" --attacks "$ATTACKS" --fractions 0.4;
       "$SIM" "${COMMON[@]}" --strategies "$OTHERS" --attacks "$ATTACKS" --fractions 0.2 ;;
    4) "$SIM" "${COMMON[@]}" --strategies softmerge,fltrust,fedavg --attacks "$ATTACKS" --fractions 0.6,0.8 ;;
    # SoftMerge and the two best baselines of the 40% row by mean final accuracy: FLTrust and
    # centered clipping (docs/benchmarks.md, "Session 13"; still so with every defense in the
    # row). One invocation, so the runner's order (seed, then attack, then strategy) finishes
    # every attack of seed 1 for all three before seed 2: a stopped run leaves whole
    # comparisons, not one strategy's seeds.
    5) "$SIM" "${COMMON[@]}" --strategies softmerge,fltrust,centered-clipping --attacks "$ATTACKS" --fractions 0.4 --seeds 1,2 ;;
    # Beyond the minimum: more seeds at 60%, where one seed's final round is too noisy to
    # read a one-point target from (docs/benchmarks.md, "Session 16").
    6) "$SIM" "${COMMON[@]}" --strategies softmerge,fltrust --attacks "$ATTACKS" --fractions 0.6 --seeds 1,2 ;;
    # A second seed at 80%, where seed 0's oracle and seed 1's differ by four points
    # (docs/benchmarks.md, "Session 31"): SoftMerge and the baselines of stage 4 on one seed.
    7) "$SIM" "${COMMON[@]}" --strategies softmerge,fltrust,fedavg --attacks "$ATTACKS" --fractions 0.8 --seeds 1 ;;
    # A third seed at 80%, SoftMerge first (its last-10 sign-flip miss of two seeds is 1.1).
    8) "$SIM" "${COMMON[@]}" --strategies softmerge --attacks "$ATTACKS" --fractions 0.8 --seeds 2 ;;
    # The baselines of stage 4 on seed 2 at 80%, for the three-seed comparison.
    9) "$SIM" "${COMMON[@]}" --strategies fltrust,fedavg --attacks "$ATTACKS" --fractions 0.8 --seeds 2 ;;
    # SoftMerge at 80% on seeds 1 and 2 again after the label-frequency bar (session 33): the
    # 15 cells in which a merge did not beat it were moved to fmnist-grid-before-constant-bar;
    # the rest are the same runs and are skipped as finished.
    10) "$SIM" "${COMMON[@]}" --strategies softmerge --attacks "$ATTACKS" --fractions 0.8 --seeds 1,2 ;;
    # Beyond the minimum: stronger heterogeneity (alpha 0.1; session 34), 40% malicious, seed 0,
    # SoftMerge, FLTrust and FedAvg against a cross-section of the attacks (the last --alpha wins).
    11) "$SIM" "${COMMON[@]}" --alpha 0.1 --strategies softmerge,fltrust,fedavg \
          --attacks none,sign-flip,label-flip,alie,ipm-100,min-max,backdoor --fractions 0.4 ;;
    # A second seed at alpha 0.1 for SoftMerge (and its oracle), whose seed-0 misses there
    # (docs/benchmarks.md, "Heterogeneity") one seed cannot tell from noise (session 36).
    12) "$SIM" "${COMMON[@]}" --alpha 0.1 --strategies softmerge \
          --attacks label-flip,sign-flip,backdoor,none,alie,ipm-100,min-max --fractions 0.4 --seeds 1 ;;
    # FLTrust and FedAvg beside it on seed 1 (sessions 36-37), against the same seven attacks.
    13) "$SIM" "${COMMON[@]}" --alpha 0.1 --strategies fltrust,fedavg \
          --attacks none,sign-flip,label-flip,alie,ipm-100,min-max,backdoor --fractions 0.4 --seeds 1 ;;
    # A third seed at alpha 0.1 (session 37), the three of them on no attack and the two flips.
    14) "$SIM" "${COMMON[@]}" --alpha 0.1 --strategies softmerge,fedavg,fltrust \
          --attacks none,sign-flip,label-flip --fractions 0.4 --seeds 2 ;;
    # Not part of the reference grid, so not run by default: `softmerge-warm-step = auto`
    # (sessions 40-41) in its own outputs, for `benchmarks/compare_grids.py` against this
    # grid. The oracle is this grid's (the setting does not touch FedAvg).
    auto)
      AUTO=(--no-oracle --strategies softmerge --set softmerge-warm-step=auto)
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks "$ATTACKS" --fractions 0.4,0.6 --seeds 0
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks sign-flip --fractions 0.4,0.6,0.8 --seeds 1,2
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks sign-flip --fractions 0.8 --seeds 0
      # Session 42: the 20% and 80% columns, then a second seed at 40%.
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks "$ATTACKS" --fractions 0.2,0.8 --seeds 0
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks "$ATTACKS" --fractions 0.4 --seeds 1
      # Attackers that scale their honest update by 3, not n: the merge step favours them.
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto-scale-3 \
          --attacks scaling --fractions 0.8 --seeds 0 --set attack-scale=3
      "$SIM" "${COMMON[@]}" --no-oracle --strategies softmerge --output benchmarks/fmnist-grid-scale-3 \
          --attacks scaling --fractions 0.8 --seeds 0 --set attack-scale=3
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --alpha 0.1 --output benchmarks/fmnist-grid-alpha0.1-warm-step-auto \
          --attacks sign-flip,label-flip,backdoor,none --fractions 0.4 --seeds 0,1,2
      # Session 43: the backdoors where the default lets them in (80%, seeds 1-2; 60%, seed 2).
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks backdoor,backdoor-replace,backdoor-evade --fractions 0.8 --seeds 1,2
      "$SIM" "${COMMON[@]}" "${AUTO[@]}" --output benchmarks/fmnist-grid-warm-step-auto \
          --attacks backdoor,backdoor-replace,backdoor-evade --fractions 0.6 --seeds 2 ;;
    # auto with softmerge-merge-step-share = open: a merge-step round is scored again at the
    # share of the clients its first merge opened (docs/benchmarks.md, "Session 43").
    open-share)
      OPEN=(--no-oracle --strategies softmerge --set softmerge-warm-step=auto --set softmerge-merge-step-share=open)
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks gaussian,layer-stealth,extreme,label-flip --fractions 0.8 --seeds 0
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --alpha 0.1 --output benchmarks/fmnist-grid-alpha0.1-warm-step-auto-open-share \
          --attacks sign-flip,label-flip,none,backdoor --fractions 0.4 --seeds 1
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks backdoor,backdoor-replace,sign-flip,min-max,scaling,alie --fractions 0.8 --seeds 0
      # Session 44: seeds 1-2 at 80% where the default lets the backdoors in, and sign-flip.
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks backdoor,backdoor-replace,sign-flip --fractions 0.8 --seeds 1,2
      # Session 44: where auto lost to the default at 40% and 60% (seed 0), and alpha 0.1 seed 2.
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks layer-stealth,sign-flip,extreme,backdoor-evade,ipm-100,scaling,min-max,mimic-fixed --fractions 0.4 --seeds 0
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks layer-stealth,gaussian --fractions 0.6 --seeds 0
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --alpha 0.1 --output benchmarks/fmnist-grid-alpha0.1-warm-step-auto-open-share \
          --attacks sign-flip,label-flip --fractions 0.4 --seeds 2
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks backdoor-replace,gaussian,scaling,fang --fractions 0.2 --seeds 0
      # Session 45: sign-flip at 60% on three seeds (the default's final-round miss), the rest
      # of the 40% column and more of the 60% column (seed 0), then seed 1 at 40%.
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks sign-flip --fractions 0.6 --seeds 0,1,2
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks mimic-fixed,backdoor,backdoor-evade,min-max,alie,label-flip --fractions 0.6 --seeds 0
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks none,label-flip,gaussian,backdoor,backdoor-replace,alie,ipm-0.1,min-sum,fang,mimic --fractions 0.4 --seeds 0
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks none,extreme,backdoor-replace,scaling,ipm-0.1,ipm-100,min-sum,fang,mimic --fractions 0.6 --seeds 0
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks sign-flip,label-flip,mimic-fixed,backdoor-evade,min-max,alie,ipm-100,extreme --fractions 0.4 --seeds 1
      # Session 46: the rest of seed 1 at 40%, then seed 2 (begun: its first four attacks ran).
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks none,backdoor,backdoor-replace,scaling,gaussian,layer-stealth,ipm-0.1,min-sum,fang,mimic \
          --fractions 0.4 --seeds 1
      "$SIM" "${COMMON[@]}" "${OPEN[@]}" --output benchmarks/fmnist-grid-warm-step-auto-open-share \
          --attacks sign-flip,backdoor-evade,mimic,mimic-fixed,alie,backdoor,backdoor-replace,label-flip,extreme,scaling,none,min-max,ipm-100,gaussian,layer-stealth,ipm-0.1,min-sum,fang \
          --fractions 0.4 --seeds 2 ;;
  esac
}

for s in "${@:-1 2 3 4 5 6 7 8 9 10 11 12 13 14}"; do
  for one in $s; do stage "$one"; done
done
