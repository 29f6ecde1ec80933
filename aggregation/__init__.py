"""Pure aggregation math: hard-concrete gates, the soft merge and candidate validation.

Nothing here imports flwr, so the soft merge can be used on its own::

    from softmerge.aggregation import SoftMergeConfig, soft_merge

    merged_state, report = soft_merge(model, client_states, (x_val, y_val), SoftMergeConfig())
    model.load_state_dict(merged_state)
    print(report.table())
"""

from .candidates import Exclusion, candidate_problem, validate_candidates
from .gates import BETA, GAMMA, ZETA, deterministic_gates, expected_l0, sample_gates
from .merge import (
    GateReport,
    MergeUnit,
    SoftMergeConfig,
    build_merge_units,
    evaluate_state,
    mixing_weights,
    soft_merge,
)

__all__ = [
    "BETA",
    "GAMMA",
    "ZETA",
    "Exclusion",
    "GateReport",
    "MergeUnit",
    "SoftMergeConfig",
    "build_merge_units",
    "candidate_problem",
    "deterministic_gates",
    "evaluate_state",
    "expected_l0",
    "mixing_weights",
    "sample_gates",
    "soft_merge",
    "validate_candidates",
]
