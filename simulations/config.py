"""The run config: every key, its type, its range and its default, checked in one place.

Flower hands the ServerApp and the ClientApp ``context.run_config``, a flat mapping
filled from ``[tool.flwr.app.config]`` and ``--run-config`` overrides. ``parse_run_config``
checks every key before any training starts and raises one :class:`ConfigError` that
names the key and what it allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..aggregation.merge import (KEEP_MODES, MAX_THREADS, MERGE_MODES, MERGE_STEP_SHARES, UNINFORMED_MERGES, UNIT_KINDS,
                                 WARM_START_STEPS, build_merge_units)
from ..server.replies import MAX_NUM_EXAMPLES
from .colluding import ADAPTIVE_ATTACKS, COLLUDING_ATTACKS, is_adaptive_attack, is_colluding_attack
from .tasks import (DATASET_CLASSES, DATASETS, MIN_PARTITION_SIZE, PARTITIONINGS, ArraySet, DatasetUnavailable,
                    TaskData, load_partition, load_task)

STRATEGIES = ("softmerge", "fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fltrust",
              "centered-clipping", "geomed")
CLIENT_ATTACKS = ("none", "sign-flip", "gaussian", "scaling", "extreme", "label-flip", "backdoor", "backdoor-replace",
                  "layer-stealth")


def trains_backdoor(attack: str) -> bool:
    """Whether a malicious client trains the pixel-trigger backdoor under ``attack``."""
    return attack in ("backdoor", "backdoor-replace") or is_adaptive_attack(attack)


FAILURE_MODES = ("raise", "timeout", "empty", "mixed")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunSettings:
    """Parsed and checked run config (field names are the keys with '-' as '_')."""

    num_server_rounds: int = 10
    strategy: str = "softmerge"
    dataset: str = "digits"
    dataset_path: str = ""
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    local_epochs: int = 3
    learning_rate: float = 0.1
    batch_size: int = 16
    server_gate_size: int = 200
    server_test_size: int = 360
    client_pool_size: int = 0
    attack: str = "extreme"
    malicious_partitions: str = "7,8,9"
    attack_scale: float = 0.0
    gaussian_std: float = 1.0
    extreme_values: str = "1e3,1e6,1e30"
    backdoor_target: int = 0
    backdoor_fraction: float = 0.5
    backdoor_boost: float = 0.0
    attack_claimed_examples: int = 0
    assumed_malicious: int = 3
    exclude_malicious: bool = False
    trim_beta: float = 0.2
    cclip_tau: float = 1.0
    cclip_iterations: int = 1
    fltrust_match_client_steps: bool = False
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    softmerge_units: str = "model"
    softmerge_mode: str = "weight"
    softmerge_steps: int = 100
    softmerge_lr: float = 0.1
    softmerge_l0: float = 0.01
    softmerge_batch_size: int = 128
    softmerge_keep: bool = True
    softmerge_keep_mode: str = "anchor"
    softmerge_tolerance: float = 0.01
    softmerge_threads: int = 1
    softmerge_max_candidates: int = 0
    softmerge_warm_temperature: float = 1.0
    softmerge_warm_step: str = "candidate"
    softmerge_warm_bend: float = 2.5
    softmerge_warm_bend_quantile: float = 0.75
    softmerge_merge_step_share: str = "all"
    softmerge_ceiling: bool = True
    softmerge_mirror_test: bool = True
    softmerge_mirror_temperature: float = 0.02
    softmerge_mirror_confidence: float = 2.0
    softmerge_mirror_specialists: float = 0.0
    softmerge_mirror_flipped: float = 0.0
    softmerge_mirror_trusted: float = 0.6
    softmerge_merge_duplicates: bool = True
    softmerge_near_duplicates: float = 0.0
    softmerge_trust: bool = True
    softmerge_trust_strength: float = 2.0
    softmerge_trust_memory: float = 0.9
    softmerge_trust_max_records: int = 100_000
    softmerge_trust_copies: bool = True
    softmerge_harm_margin: float = 0.25
    softmerge_example_weights: bool = False
    softmerge_beat_constant: bool = True
    softmerge_uninformed_merge: str = "aligned"
    output_dir: str = "results/flwr-run"
    resume: bool = True
    round_timeout: float = 600.0
    min_nodes: int = 2
    client_failure_rate: float = 0.0
    client_failure_mode: str = "mixed"

    @property
    def malicious_ids(self) -> frozenset[int]:
        return parse_id_list(self.malicious_partitions)

    @property
    def extreme_factors(self) -> tuple[float, ...]:
        return parse_extreme_values(self.extreme_values)

    @property
    def merge_units(self) -> str | list[str]:
        """``softmerge-units`` as SoftMergeConfig takes it: a unit kind, or the list of name patterns."""
        if self.softmerge_units in UNIT_KINDS:
            return self.softmerge_units
        return [pattern.strip() for pattern in self.softmerge_units.split(",")]


def task_data(settings: RunSettings) -> TaskData:
    """The run's dataset, split into the server's gate and test splits and the client pool."""
    return load_task(settings.dataset, settings.server_gate_size, settings.server_test_size, settings.seed,
                     settings.dataset_path, settings.client_pool_size)


def dataset_problem(settings: RunSettings, num_clients: int | None = None) -> str | None:
    """Why the run's dataset cannot be loaded (missing, damaged, too small for its splits), or None.

    With ``num_clients``, also why its client pool cannot be split among them (too few
    examples, or no Dirichlet draw that gives every client its minimum): otherwise every
    client fails to load its partition and the run fails only after its last round. For the
    command-line tools, before any run starts Flower. The load is cached in this process
    (where the ServerApp of a simulation runs); the clients load their partitions in their
    own processes.
    """
    try:
        task_data(settings)
        if num_clients:
            partition_data(settings, 0, num_clients)
    except (DatasetUnavailable, ValueError) as error:
        return str(error)
    return None


def partition_data(settings: RunSettings, partition_id: int, num_partitions: int) -> ArraySet:
    """A client's partition of the run's client pool."""
    return load_partition(settings.dataset, partition_id, num_partitions, partitioning=settings.partitioning,
                          alpha=settings.dirichlet_alpha, gate_size=settings.server_gate_size,
                          test_size=settings.server_test_size, seed=settings.seed, path=settings.dataset_path,
                          pool_size=settings.client_pool_size)


def parse_id_list(text: str) -> frozenset[int]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        ids = frozenset(int(item) for item in items)
    except ValueError:
        raise ConfigError("malicious-partitions must be comma-separated partition ids, e.g. '7,8,9'; "
                          f"got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"malicious-partitions must hold ids >= 0; got {text!r}")
    return ids


def parse_extreme_values(text: str) -> tuple[float, ...]:
    items = [item.strip().lower() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ConfigError("extreme-values must list at least one factor, 'inf' or 'nan'")
    try:
        return tuple(float(item) for item in items)
    except ValueError:
        raise ConfigError(f"extreme-values must be numbers, 'inf' or 'nan', comma-separated; got {text!r}") from None


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"one of {', '.join(options)}"


MAX_SEED = 2**32 - 1


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f">= {low}"


def _closed_interval(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"in [{low}, {high}]"


def _open_interval(low: float, high: float, include_high: bool = True) -> Callable[[Any], str | None]:
    def check(value: float) -> str | None:
        ok = low < value <= high if include_high else low < value < high
        return None if ok else f"in ({low}, {high}{']' if include_high else ')'}"
    return check


def _units(value: str) -> str | None:
    if value in UNIT_KINDS:
        return None
    patterns = [p.strip() for p in value.split(",")]
    return (None if value.strip() and all(patterns)
            else f"one of {', '.join(UNIT_KINDS)} or comma-separated name patterns")


_RULES: dict[str, Callable[[Any], str | None]] = {
    "num_server_rounds": _at_least(1),
    "strategy": _choice(STRATEGIES),
    "dataset": _choice(DATASETS),
    "partitioning": _choice(PARTITIONINGS),
    "dirichlet_alpha": _open_interval(0, math.inf),
    # Clients seed torch with seed * 1,000,003 + ..., which must fit torch's signed 64 bits.
    "seed": _closed_interval(0, MAX_SEED),
    "local_epochs": _at_least(1),
    "learning_rate": _open_interval(0, 10),
    "batch_size": _at_least(1),
    "server_gate_size": _at_least(1),
    "server_test_size": _at_least(1),
    "client_pool_size": _at_least(0),
    "attack": lambda v: None if v in CLIENT_ATTACKS or is_colluding_attack(v) else (
        f"one of {', '.join(CLIENT_ATTACKS + COLLUDING_ATTACKS + ADAPTIVE_ATTACKS)} (or ipm-<eps>, "
        "min-max-<unit|sign|std>, min-sum-<unit|sign|std>, backdoor-evade-<quantile>, any colluding one "
        "with -jitter)"),
    "attack_scale": _at_least(0),
    "gaussian_std": _at_least(0),
    "backdoor_target": _at_least(0),
    "backdoor_fraction": _open_interval(0, 1),
    "backdoor_boost": _at_least(0),
    "assumed_malicious": _at_least(0),
    "trim_beta": _open_interval(0, 0.5, include_high=False),
    "cclip_tau": _open_interval(0, math.inf),
    "cclip_iterations": _at_least(1),
    "fraction_train": _open_interval(0, 1),
    "fraction_evaluate": lambda v: None if 0 <= v <= 1 else "in [0, 1]",
    "softmerge_units": _units,
    "softmerge_mode": _choice(MERGE_MODES),
    "softmerge_keep_mode": _choice(KEEP_MODES),
    "softmerge_uninformed_merge": _choice(UNINFORMED_MERGES),
    "softmerge_warm_step": _choice(WARM_START_STEPS),
    "softmerge_warm_bend": _at_least(0),
    "softmerge_warm_bend_quantile": _closed_interval(0, 1),
    "softmerge_merge_step_share": _choice(MERGE_STEP_SHARES),
    "softmerge_steps": _at_least(0),
    "softmerge_lr": _open_interval(0, 100),
    "softmerge_l0": _at_least(0),
    "softmerge_batch_size": _at_least(1),
    "softmerge_tolerance": _at_least(0),
    "softmerge_threads": _closed_interval(0, MAX_THREADS),
    "softmerge_max_candidates": _at_least(0),
    "softmerge_warm_temperature": _open_interval(0, 100),
    "softmerge_mirror_temperature": _open_interval(0, 100),
    "softmerge_mirror_confidence": _at_least(0),
    "softmerge_mirror_specialists": _at_least(0),
    "softmerge_mirror_flipped": _at_least(0),
    "softmerge_mirror_trusted": _closed_interval(0, 1),
    "softmerge_trust_strength": _at_least(0),
    "softmerge_trust_memory": _closed_interval(0, 1),
    "softmerge_trust_max_records": _at_least(1),
    "softmerge_harm_margin": _at_least(0),
    "softmerge_near_duplicates": _at_least(0),
    # Above the server's bound every malicious reply would be screened out as absurd, and the
    # attack would read as clients that failed.
    "attack_claimed_examples": _closed_interval(0, MAX_NUM_EXAMPLES),
    "round_timeout": _open_interval(0, 86400),
    "min_nodes": _at_least(1),
    "client_failure_rate": lambda v: None if 0 <= v < 1 else "in [0, 1)",
    "client_failure_mode": _choice(FAILURE_MODES),
}


def node_count_problem(strategy: str, replies: int, assumed_malicious: int) -> str | None:
    """Why ``strategy`` cannot work on ``replies`` replies a round with f assumed malicious; None if it can.

    Bulyan (El Mhamdi et al. 2018) needs n >= 4f + 3 and Krum (Blanchard et al. 2017) n >=
    2f + 3; below that Flower's Bulyan raises every round (the round keeps the old model)
    and Krum scores each reply on fewer than one neighbour's worth of distances.
    """
    f = assumed_malicious
    if strategy == "bulyan" and replies < 4 * f + 3:
        return f"Bulyan needs n >= 4f + 3 (n={replies}, f={f})"
    if strategy in ("krum", "multikrum") and replies < 2 * f + 3:
        return f"Krum needs n >= 2f + 3 (n={replies}, f={f})"
    return None


def replies_per_round(settings: RunSettings, num_nodes: int) -> int:
    """How many nodes a round trains: Flower samples int(n * fraction_train), and at least min-nodes.

    As Flower's ``FedAvg.configure_train`` sizes its sample, with ``min_train_nodes`` =
    ``min-nodes`` (see :func:`softmerge.server.strategies.build_strategy`).
    """
    return max(int(num_nodes * settings.fraction_train), settings.min_nodes)


def rule_replies(settings: RunSettings, num_nodes: int) -> int:
    """The fewest replies a round's rule can be given: the sampled nodes', less the malicious ones
    the oracle drops (``exclude-malicious``; at worst every malicious node is sampled)."""
    replies = replies_per_round(settings, num_nodes)
    if settings.exclude_malicious:
        replies -= min(sum(1 for i in settings.malicious_ids if i < num_nodes), replies)
    return replies


def malicious_per_round(settings: RunSettings, num_nodes: int) -> float:
    """How many of a round's replies are malicious, on average over Flower's uniform sampling (at least one)."""
    return max(1.0, len(settings.malicious_ids) * replies_per_round(settings, num_nodes) / num_nodes)


def malicious_ids_outside(settings: RunSettings, count: int) -> list[int]:
    """The malicious partition ids that name none of ``count`` clients, when they matter."""
    # With no attack and no oracle the ids name nobody in particular, so they cannot be wrong.
    if settings.attack == "none" and not settings.exclude_malicious:
        return []
    return sorted(i for i in settings.malicious_ids if i >= count)


def check_simulation(settings: RunSettings, num_clients: int) -> None:
    """Raise :class:`ConfigError` if a simulation of ``num_clients`` clients cannot run these settings.

    The server waits for ``min-nodes`` nodes (Flower's default 2) before a round starts, so
    fewer clients would wait forever; malicious ids beyond the clients, or none at all, would silently attack (or,
    for the oracle, leave out) nobody; and a robust rule given fewer replies than it needs would never
    aggregate (Bulyan) or lose its guarantee (Krum).
    """
    if num_clients < settings.min_nodes:
        raise ConfigError(f"a simulation needs at least min-nodes = {settings.min_nodes} clients (the server waits "
                          f"for that many before every round); got {num_clients}")
    if outside := malicious_ids_outside(settings, num_clients):
        raise ConfigError(f"malicious partition ids {outside} do not exist with {num_clients} clients")
    if settings.attack != "none" and not settings.malicious_ids:
        raise ConfigError(f"attack '{settings.attack}' with no malicious partition would run unattacked: set "
                          "malicious-partitions (or attack='none')")
    if settings.client_pool_size and settings.client_pool_size < MIN_PARTITION_SIZE * num_clients:
        raise ConfigError(f"client-pool-size {settings.client_pool_size} is too small for {num_clients} clients of at "
                          f"least {MIN_PARTITION_SIZE} examples each")
    replies = rule_replies(settings, num_clients)
    problem = node_count_problem(settings.strategy, replies, settings.assumed_malicious)
    if problem:
        dropped = (" (after the oracle drops the malicious ones, at worst every one of them)"
                   if settings.exclude_malicious else "")
        raise ConfigError(f"strategy '{settings.strategy}' with assumed-malicious {settings.assumed_malicious} "
                          f"and {replies} replies a round{dropped}: {problem}")


def parse_set_options(items: Iterable[str], reserved: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The command line's ``--set KEY=VALUE`` options as a run config.

    A value is typed as its key's setting expects: text stays text for a text setting
    (``output-dir=2026_12_08`` is not the number 20261208), and otherwise reads as true,
    false, an integer or a number where it is one, as a TOML run config would give it.
    ``reserved`` maps the keys a tool sets itself to what to use instead.
    """
    text_keys = {f.name.replace("_", "-") for f in fields(RunSettings) if f.type in (str, "str")}
    config: dict[str, Any] = {}
    for item in items:
        key, separator, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not separator:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        if reserved and key in reserved:
            raise ConfigError(f"--set {key}: {reserved[key]}")
        config[key] = value if key in text_keys else _typed_text(value)
    return config


def _typed_text(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_run_config(run_config: Mapping[str, Any], *, check_paths: bool = True) -> RunSettings:
    """Check every key of a Flower run config and return typed settings.

    Unknown keys are an error too: a typo would otherwise silently run the default.
    """
    known = {f.name.replace("_", "-"): f for f in fields(RunSettings)}
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known keys are {sorted(known)}")
    values: dict[str, Any] = {}
    for key, spec in known.items():
        if key not in run_config:
            continue
        value = run_config[key]
        expected = spec.type if isinstance(spec.type, type) else {"int": int, "float": float, "str": str,
                                                                   "bool": bool}[spec.type]
        value = _coerce(key, value, expected)
        rule = _RULES.get(spec.name)
        if rule is not None:
            problem = rule(value)
            if problem is not None:
                raise ConfigError(f"run-config key '{key}' must be {problem}; got {value!r}")
        values[spec.name] = value
    settings = RunSettings(**values)
    settings.malicious_ids  # noqa: B018  (parses, raising ConfigError on bad text)
    settings.extreme_factors  # noqa: B018
    classes = DATASET_CLASSES[settings.dataset]
    if settings.backdoor_target >= classes:
        # Out of range, the backdoored clients crash in training, their replies are dropped,
        # and the attack success rate reads 0: a failed attack that looks like a defended one.
        raise ConfigError(f"run-config key 'backdoor-target' must be a class of {settings.dataset} "
                          f"(0..{classes - 1}); got {settings.backdoor_target}")
    if settings.softmerge_example_weights and settings.softmerge_mode != "weight":
        raise ConfigError("run-config key 'softmerge-example-weights' needs softmerge-mode = 'weight'; "
                          f"got softmerge-mode = {settings.softmerge_mode!r}")
    if settings.softmerge_units not in UNIT_KINDS:
        _check_unit_patterns(settings)
    if check_paths and settings.dataset == "fashion-mnist" and settings.dataset_path:
        from pathlib import Path

        if not Path(settings.dataset_path).is_dir():
            raise ConfigError("run-config key 'dataset-path' must be an existing directory; "
                              f"got {settings.dataset_path!r}")
    return settings


def _check_unit_patterns(settings: RunSettings) -> None:
    """A ConfigError unless every softmerge-units pattern takes a tensor of the task's model.

    Checked here, before any training, because the merge would otherwise stop the run in
    its first round (a typo such as 'fc_2.*' for 'fc2.*').
    """
    import torch

    from .tasks import build_model

    with torch.random.fork_rng():  # building the model seeds torch; parsing must not
        model = build_model(settings.dataset)
    try:
        build_merge_units(model, settings.merge_units)
    except ValueError as error:
        raise ConfigError(f"run-config key 'softmerge-units': {error}") from None


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config key '{key}' must be true or false; got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"run-config key '{key}' must be an integer; got {value!r}")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"run-config key '{key}' must be a finite number; got {value!r}")
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # `--set malicious-partitions=3` and TOML `extreme-values = 1e6` arrive as numbers.
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"run-config key '{key}' must be a string; got {value!r}")
    return value


def to_run_config(settings: RunSettings) -> dict[str, Any]:
    """The run-config mapping (hyphenated keys) for the given settings."""
    return {f.name.replace("_", "-"): getattr(settings, f.name) for f in fields(settings)}
