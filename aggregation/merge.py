"""Soft merging of candidate models with hard-concrete gates.

Chen et al., "Soft Merging: A Flexible and Robust Soft Model Merging Approach for
Enhanced Neural Network Performance", arXiv:2309.12259 (2023); gates from Louizos,
Welling & Kingma (2018), see :mod:`softmerge.aggregation.gates`.

The candidates (local optima returned by clients, plus by default the current global
model, the *keep* candidate) are grouped into merge units U: the whole model by default, or
one unit per layer, per tensor or per name pattern. Each (unit u, candidate k) pair has one
gate z_uk with parameter log_alpha_uk. The merged
parameters of unit u are

    theta_u = sum_k w_uk * theta_uk,

with mixing weights, by mode,

    weight (default):  w_uk = z_uk / sum_j z_uj          (convex: the scale stays right)
    select:            w_u  = one_hot(argmax_k z_uk)      (straight-through gradient)
    sum:               w_uk = z_uk                        (raw soft merge, an ablation)

and a unit whose gates are all 0 falls back to the keep candidate. Only log_alpha is
learned, by Adam on the server's clean gate split:

    min_{log_alpha}  mean CE(f(x; theta(z)), y)  +  lambda * mean_{u,k} P(z_uk != 0).

The candidates' weights are never changed, only gated. The merged model is built from
the deterministic gates.

No harm. The keep model is the fallback, not a share of an ordinary merge: by default
(``keep_mode="anchor"``) the first gate learning leaves its gate shut, so the merge is the
clients' alone. A merge whose gate-split loss exceeds the keep model's by more than
``harm_margin`` nats (0.25) is rejected, and the gates are learned again with the keep
model as a candidate (where ``keep_mode="candidate"`` starts), then once more from closed
client gates; if the last merge fails too (or there is no keep candidate), the keep model
is returned. With the keep candidate and mode weight or select, the keep model alone is a
point of the gates' search space, so a rejection there is an optimisation failure. Such
failures came where most candidates were poisoned and their half-open warm start made a
merge that predicts a constant, from which gate learning did not move.

Units. One gate per candidate (``units="model"``) is the default. Per-layer gates (the
paper's setting, and this project's default until 2026-11-23) learn several times as many
gate parameters from the same few hundred gate examples, and fit them: with no attack they
closed about half the honest clients in the convolutional layers, and they let a candidate
that is bad as a whole lend single layers to the merge. On the reference grid (Fashion-MNIST,
20 clients, 40% malicious) one gate per client raised the worst case over 16 attacks from
82.2 to 83.0 and the cells within a point of the oracle from 8 to 14 (docs/benchmarks.md).

Warm start. log_alpha starts from each candidate's own gate-split loss:

    start_k = init - (L(theta_k) - min_j L(theta_j)) / T_own.

Two rules sharpen it, both on by default. The ceiling keeps gate learning from raising
log_alpha above its start. The mirror test also bounds the start of a candidate whose
update ascends:

    start_k <= LOG_ALPHA_CLOSED - d_k / T_mirror,   d_k = L(theta_k) - L(2 theta_keep - theta_k),

for those candidates whose d_k exceeds z standard errors of its per-example differences on
the gate split (``mirror_confidence`` z, 2 by default). The difference between the update's
loss and its reflection's through the global model keeps the odd-order terms of the loss
around it (the direction) and cancels the even ones (the curvature that makes every
non-IID local model look worse than the global one). A sign-flipped or Fang-crafted
update ascends and starts closed. The keep candidate (d = 0 exactly) and honest updates
within the noise around d = 0 keep their own-loss start. With z = 0 every candidate is
bounded, the keep candidate and updates that barely move (IPM with a small epsilon) closed
too; that variant let backdoors through, because a backdoored update descends on clean
data and with the rest closed took a quarter of the weight. docs/benchmarks.md measures
all three settings.

Specialists (opt-in, ``mirror_specialist_ratio``). The test cannot tell two updates apart
that it sees as the same: an honest client whose data hold few classes lowers their loss a
lot and raises the rest a little, and on a class-balanced gate split that can ascend as a
whole; on the reference grid a fifth of the honest client-rounds were closed this way,
with or without an attack, and the honest average lost those clients' classes. What tells
it from a flipped update is where the gain is: a specialist's largest one-class loss
reduction is several times its mirror image's, while a flipped generalist's is smaller
than its mirror's (the honest original's). With the ratio r > 0, a candidate is not
bounded when its best one-class gain is at least r times its mirror image's
(:func:`best_class_gain`, :func:`is_specialist`).

Duplicates. Candidates that are bit-for-bit identical (the keep candidate included) are
gated as one: one gate per unit, and the group's mixing weight is split equally among its
members. They are grouped before anything is scored, so a group costs one own-loss pass
(and one mirror pass) however many clients sent it. Colluding attacks that send one
crafted model from many clients, or copy one honest client's, would otherwise hold as many
gates as senders; a client that resends the global model joins the keep candidate. With
``near_duplicate_tolerance`` > 0, replies whose per-example gate-split losses are nearly
the same (:func:`near_duplicate_clusters`) are grouped too, and gated as their mean: a
little noise on each copy does not make it a model of its own.

Trust over rounds (when the caller passes it; the Flower strategy does by default). A caller
that keeps each client's gate record across rounds (:mod:`softmerge.aggregation.trust`; the
Flower strategy, with ``trust=True``, its default) passes
a trust per candidate, and a candidate below 1/2 starts at most at
``init_log_alpha + trust_strength * logit(trust)``. The warm-start ceiling stays at its own
evidence, so learning may re-open it that far.
The record also speaks for a client in the mirror test: one whose trust is at least
``mirror_trusted`` (0.6) is not bounded by it, since one round's pair of models cannot
settle it for a client with few classes (see ``SoftMergeConfig.mirror_trusted``).

Numerics. Non-finite or mismatched candidates are excluded before gating. Finite but
extreme candidates are gated like any other; three guards keep gate learning finite on
them: log_alpha is warm-started from each candidate's own validation loss (a candidate
whose loss is astronomical starts closed), a step whose loss is not finite is skipped
rather than applied, and the gradient on log_alpha is made finite and norm-clipped.

Cost. The candidates are stacked once per round into one contiguous (K, d_u) matrix per
unit (parameters and buffers apart), so a gate step forms every merged tensor with one
vector-matrix product per unit and runs the model once, through
``torch.func.functional_call``; nothing in a step loops over candidates. A step reads the
K candidates twice (the product, and its transpose in the backward pass) and costs one
forward and backward pass of the model on a gate batch; docs/performance.md measures it
against that floor. :func:`stack_in_place` lets a caller that holds decoded client
models (the Flower strategy) move them into that layout instead of copying them, which
keeps the round's memory near K model copies. Gate learning stops when the deterministic
gate-split objective has stopped improving (see :class:`SoftMergeConfig`), and the
checked gates with the lowest objective are kept.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import time
import warnings
from contextlib import contextmanager
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.optim.adam import adam as adam_update

from .candidates import Exclusion, as_tensor_state, candidate_problem, validate_candidates
from .gates import LOG_ALPHA_CLOSED, deterministic_gates, expected_l0, sample_gates
from .robust import fltrust_server_model
from .trust import NEUTRAL_TRUST, trust_bound

MERGE_MODES = ("weight", "select", "sum")
UNIT_KINDS = ("model", "layer", "tensor")
KEEP_MODES = ("candidate", "anchor")
UNINFORMED_MERGES = ("direction", "aligned", "first")
WARM_START_STEPS = ("candidate", "merge", "auto")
MERGE_STEP_SHARES = ("all", "open")
LOG_ALPHA_MIN = -10.0
# The starts a soft merge tries in turn until one passes the no-harm check (GateReport.start).
CLIENTS_START, KEEP_START, CLOSED_START = "the clients alone", "the keep model as a candidate", "closed client gates"
DIRECTION_START = "the update directions"
# Appended to a start's name when a merge-step round was learned again from the own step.
OWN_STEP_SUFFIX = ", scored at the own step"
OPEN_SHARE_SUFFIX = ", scored at the open share"
# Merge losses are float32 means, the label entropy a float64 sum: a model that predicts the
# label frequencies exactly can land a few 1e-7 nats under the entropy.
CONSTANT_BAR_SLACK = 1e-5
KEEP_LABEL = "keep"
# The convergence check scores the deterministic gates on at most this many gate batches
# of examples: a forward pass of two batches every ``check_every`` steps costs a few percent.
PROBE_BATCHES = 2
# Gate-split examples per forward and backward pass when looking for parameters the loss does not read.
BLIND_PROBE_CHUNK = 512
# The scoring passes (every candidate's and mirror image's per-example losses) take the
# gate split in the fewest chunks of at most this many input values (but at least
# MIN_SCORING_CHUNK examples), cut as evenly as they go: 167 Fashion-MNIST images, so the
# 300-image split goes as two of 150. Whole, it sends SmallCNN through 15 MB activations
# that glibc may hand back to the system after a pass and page-fault afresh on the next;
# chunks this size reuse freed blocks. A merge of 100 SmallCNN candidates scored in 8.7
# against 12.4 s (43 against 61 ms a pass, one thread); one of 20, where glibc kept the
# blocks anyway, in 1.8 s either way (docs/performance.md, "Session 31"). The per-example
# losses of the 300-image split are bit-identical to one pass's with this torch build for
# chunks of 8 to 256 images, not for chunks of 1 or 2, which even cuts never make. The
# digits split (200 x 64 values) stays whole.
SCORING_CHUNK_VALUES = 1 << 17
MIN_SCORING_CHUNK = 64
# torch intra-op threads during a merge (0: leave torch's setting). One, on this 2-core
# machine: a second OpenMP thread gains little on a memory-bound contraction, and as soon as
# anything else runs (Ray workers, another experiment) it makes a gate step several times
# slower; docs/performance.md measures both.
DEFAULT_THREADS = 1
# torch.set_num_threads takes a C int, and each thread is an OS thread: a count beyond any
# machine's cores is a typo, which would otherwise fail every merge of the run.
MAX_THREADS = 1024


@dataclass
class SoftMergeConfig:
    """Settings of one soft merge.

    Attributes:
        units: ``"model"`` (the default: one gate per candidate), ``"layer"`` (one gate
            per module: weight, bias and buffers share it), ``"tensor"``, or a list of
            fnmatch patterns, one unit each; tensors no pattern matches form one last unit.
            Finer units can take good layers from a partly bad candidate, but learn more
            gates from the same gate split (see "Units" in the module docstring).
        mode: ``"weight"``, ``"select"`` or ``"sum"`` (see the module docstring).
        steps: the most gate-learning steps; fewer when the gates converge.
        lr: Adam learning rate on log_alpha.
        l0_lambda: weight of the expected-L0 penalty.
        batch_size: gate-split examples per step.
        seed: seeds the gate noise and the batch order.
        include_keep: add the current global model (the keep model) to the candidates;
            ``keep_mode`` says how it is gated.
        keep_mode: what the keep candidate does when ``include_keep`` is on.
            ``"anchor"`` (the default since 2026-11-24): the first gate learning leaves
            it closed, so the merge is the clients' alone and every open client's update
            counts in full; it is the fallback of a unit whose gates all close. If that
            merge fails the no-harm check, gates are learned again with the keep model
            as a candidate (the ``"candidate"`` start), then from closed client gates
            (see ``harm_margin``). ``"candidate"``: it is gated like any client and
            starts from its own loss, which is usually the lowest, so it starts most
            open. With few honest clients that keep share, about a quarter of the
            weight, damps every round's step; on the reference grid ``"anchor"`` is
            higher in every 80% cell and about even at 20–60% (docs/benchmarks.md,
            "Session 10" and "Session 11").
        warm_start: start log_alpha from each candidate's own validation loss.
        init_log_alpha: starting log_alpha of the best candidate.
        warm_start_temperature: nats of extra loss that cost one unit of log_alpha.
        warm_start_step: the step at which the own-loss start and the mirror test score
            a candidate. ``"candidate"`` (the default): the candidate itself, keep +
            delta. ``"merge"``: the step it takes inside an even merge of the n gated
            client groups, keep + delta / n (its mirror keep - delta / n), each
            example's loss change against the keep model multiplied by n, so that the
            temperatures keep their units (to first order the same score, the
            directional derivative along delta). A client whose data hold one or two
            classes takes a full step that overshoots: much better on its classes,
            worse on the rest, so on a class-balanced gate split its own loss is nats
            above the keep model's and its full step ascends, which closes it (the
            ceiling) though the average it belongs in needs it; a twentieth of that
            step descends. An experiment for strong heterogeneity (Dirichlet alpha =
            0.1; docs/benchmarks.md, "Session 38"). ``"auto"``: each round, the merge
            step if the round's bend (:func:`round_bend`) reaches ``warm_start_bend``,
            else the candidate's step (docs/benchmarks.md, "Session 40"). Under either,
            a round scored at the merge step whose starts (the clients alone, then the
            keep model with them; the closed start is not tried) all harm by more than
            ``harm_margin`` is learned again from the own step's starts instead: an update scaled by
            about n (model replacement, the scaling attack) reads at keep + delta / n as
            an ordinary step with n times its gain, and a malicious majority of them
            opens together and overshoots (docs/benchmarks.md, "Session 42").
        warm_start_bend: nats of bend from which ``"auto"`` scores at the merge step.
        warm_start_bend_quantile: the quantile of the clients' bends that ``"auto"``
            compares with ``warm_start_bend``. Clients that send small updates can
            only lower the round's bend to the honest clients' quantile at
            ``(q (n - 1) - m) / (n - m - 1)`` (m of n such clients), so a high quantile keeps the
            merge step when a minority tries to hide the heterogeneity; clients that
            send large updates can raise it, which buys them the merge step's scoring.
        merge_step_share: the share of the merge step. ``"all"`` (the default): 1/n, n the
            round's client groups. ``"open"``: when a round scored at the merge step passes the
            no-harm check with k of its n client groups open, 0 < k < n, each open update moves
            the merge by delta / k, not the delta / n it was scored at, and a loss that curves
            up along it (the second-order term, which the scaling by n divides by n) was read
            at n / k of its size; the round is scored again at keep + delta / k, loss changes
            times k, and learned again from those starts. The second merge stands if it passes
            the check, else the first does (``GateReport.open_share``).
        warm_start_ceiling: log_alpha never rises above its warm start (own loss and
            mirror test; a trust bound lowers the start, not this ceiling), so a
            candidate's own validation loss bounds the trust it can get: gate learning may close a gate
            but not open it further than that loss allows. Without the ceiling, a few
            hundred gate examples let learning re-open candidates whose own loss is
            several nats worse (sign-flipped ones): mixing a little of them in lowers
            the gate split's cross-entropy while it raises the test loss, which is
            fitting the gate split, not the task (docs/benchmarks.md measures it).
        mirror_test: a candidate must also show that its update lowers the gate-split
            loss: the warm start compares its own loss with that of its mirror image
            through the keep model, 2 * keep - candidate. The difference of the two,
            d = L(keep + delta) - L(keep - delta), cancels the even-order terms of the
            loss around the keep model (the curvature that makes every non-IID local
            model look worse than the global one) and keeps the odd ones, the
            direction: an honest update has d < 0, a sign-flipped one d > 0 and one that
            barely moves (an old model resent, IPM with a small epsilon) d of about 0.
            The start is then min(own-loss start, LOG_ALPHA_CLOSED - d /
            mirror_temperature): a candidate whose update does not descend starts at or
            below the closed threshold. The keep candidate has d = 0.
        mirror_temperature: nats of mirror difference d per unit of log_alpha.
        mirror_specialist_ratio: > 0 spares a specialist from the mirror test's bound. A
            client whose data hold few classes trains an update that lowers the loss of
            those classes a lot and raises the rest a little, so on a class-balanced gate
            split it can ascend as a whole (d > 0) and be bounded, round after round,
            although the average it belongs in needs it. Its mirror image is the
            opposite: a little better on many classes, much worse on a few. A flipped
            generalist (a sign-flipped update, Fang's) is the mirror of that: much worse on
            the classes its honest original learned, a little better on the rest. So a
            candidate that fails the test is still not bounded when its largest per-class
            loss reduction against the keep model (the mean over the gate examples of one
            class; :func:`best_class_gain`) is at least this many times its mirror image's.
            0 (the default) bounds every candidate that fails the test; docs/benchmarks.md
            ("Session 20") measures 1.5 and 3 on the replica.
        mirror_flipped_ratio: > 0 bounds a flipped specialist, which the mirror test
            passes: the sign-flipped update of a client with few classes is a little
            better on many classes and much worse on its own, so on a class-balanced gate
            split it can descend as a whole, while its mirror image (the honest update)
            lowers one class's loss several times as much as the candidate lowers any. A
            candidate whose mirror image's largest per-class loss reduction is at least
            this many times its own (or which lowers no class's loss while its mirror
            image does) starts at or below the closed threshold, as one that fails the
            test, whatever its trust or the test's significance. 0 (the default) leaves
            it to the mirror test; an experiment (docs/benchmarks.md, "Session 25").
        mirror_trusted: > 0 spares a client whose trust over past rounds (the ``trust``
            passed to :func:`soft_merge`) is at least this from the mirror test's bound.
            One round's test cannot tell an honest specialist from a flipped update (the
            pair of models it compares is the same; see ``mirror_specialist_ratio``),
            but the record can: an honest specialist was open in most of its rounds, a
            flipped client shut in most. The trust bound, the own-loss start and gate
            learning still apply. 0.6 by default (docs/benchmarks.md, "Session 21" to
            "Session 23": through Flower, in every cell of the reference grid within
            -0.4 ... +1.5 points of 0 on the mean of the last 10 rounds, label-flip's misses
            gone; at 80% malicious the backdoor's success rises from 21% to 30%); 0 bounds
            every candidate that fails the test. Only read when trust is passed. A client
            with no record (a newcomer, trust 1/2; ``recorded`` of :func:`soft_merge`) is
            spared only while no client has a record (``record_held`` of
            :func:`soft_merge`), as in a federation's first round: later, one that came
            back under a new identity would otherwise shed the test by doing so.
        mirror_confidence: z > 0 makes the mirror test a significance test: only a
            candidate whose d exceeds z standard errors of its per-example differences on
            the gate split (an update that ascends beyond what the split's sampling noise
            explains) is bounded; the rest, and the keep candidate (d = 0 exactly), keep
            their own-loss start. 2 by default; 0 bounds every candidate. Non-IID honest
            updates scatter around d = 0; bounding them all closes the ones that ascend
            slightly, and with them gone the backdoored updates, which descend on clean
            data, took a quarter of the weight (docs/benchmarks.md).
        merge_duplicates: candidates that are bit-for-bit identical (the keep model
            included) share one gate, and their merged weight is split among them. A
            group of identical replies is one model however many clients sent it:
            colluding attacks that send one crafted reply from every malicious client
            (IPM, ALIE, min-max, min-sum) or copy one honest client (Mimic), and clients
            that resend the global model unchanged, count once. Exact only: a reply
            perturbed by any amount is a candidate of its own (see the next option).
        near_duplicate_tolerance: > 0 also groups replies that are near-identical in
            what they do on the gate split (:func:`near_duplicate_clusters`): two
            candidates whose per-example gate-split losses differ, in root mean square,
            by at most this fraction of the smaller of how far each one's losses moved
            from the keep model's share one gate, and the group is gated as the mean of
            its members.
            Colluding clients that add a little noise to one crafted or copied reply
            (the ``-jitter`` attacks) would otherwise hold a gate, and with
            ``example_weights`` a count, per copy. It costs one forward pass of the keep
            model and one of each group's mean model. A group's start with
            ``initial_log_alpha`` is its first member's column, its trust its least
            trusted member's, and its example count (with ``example_weights``) its
            largest member's: copies add no data. 0 (the default) groups exact copies only.
        max_grad_norm: clip on the gradient norm of log_alpha.
        tolerance: every ``check_every`` steps the deterministic gates are scored by
            the objective itself, without noise: the cross-entropy of the merge they
            build on the gate split (2 x ``batch_size`` of its examples, drawn with
            ``seed``, if it is larger) plus the L0 term. Gate learning has converged when,
            for ``patience`` checks in a row, that score has not fallen by more than
            ``tolerance`` (nats) below its value at the last check that did; the checked
            gates with the best score are the result. No stop comes before the most
            open starting gate could have closed at ``lr`` per step, (max log_alpha -
            LOG_ALPHA_CLOSED) / lr steps: 44 with the defaults. 0 never stops early. The
            default, 0.01 nats, is below what a few hundred gate examples can resolve (the
            standard error of their mean cross-entropy is several hundredths of a nat), so
            stopping there gives up no measurable fit; at 0.001 the criterion almost never
            fires (docs/performance.md).
        check_every: steps between convergence checks.
        patience: checks in a row without an improvement above ``tolerance`` before
            gate learning stops.
        threads: torch intra-op threads during the merge (restored afterwards); 0 leaves
            torch's setting as it is. Default 1 (see ``DEFAULT_THREADS``).
        max_candidates: pre-selection for rounds with many clients: when more than this
            many client candidates are valid, only the ones with the lowest own
            gate-split loss are stacked and gated (the keep candidate always is); the
            rest are reported as excluded. 0 (the default) gates every valid candidate.
        trust_strength: how far a client's record over past rounds bounds its start
            (log_alpha per unit of log-odds of its open rate; see
            :mod:`softmerge.aggregation.trust`). It applies only when the caller passes
            ``trust`` to :func:`soft_merge`; 0 turns the bound off.
        harm_margin: the no-harm check, in nats. If the merged model's mean cross-entropy
            on the gate split exceeds the keep model's by more than this, the merge is
            rejected, and gate learning runs once more from the keep model's side: every
            client gate starts at the closed threshold (and is still capped by its warm
            start). (With ``keep_mode="anchor"``, the default, the first attempt is the
            clients' merge alone, and the keep model's gated start is tried between it
            and this one.) If the last merge fails the check too, or ``include_keep`` is
            off, the keep model (the current global model) is returned. With the keep candidate and mode
            weight or select, the keep model alone is a point of the gates' search space,
            so such a merge is an optimisation failure, not a finding: with
            16 label-flipped candidates of 20, their warm start left them half open, the
            merge they made predicted a constant (gate-split loss ln 10, accuracy 10%),
            and gate learning did not move them from there. Over the 3,330 merges of the
            reference grid, ordinary rounds raised the gate-split loss by at most 0.09
            nats; those failures by 0.4 to 1.8 (docs/benchmarks.md, "Session 9"). 0 turns
            the check off, ``beat_constant``'s bar included.
        example_weights: the gates select and the clients' example counts weigh (mode
            ``"weight"`` only; see :func:`example_count_weights`): after gate learning,
            the candidates whose gate is above 1/2 are merged with weights proportional
            to their example counts, each capped at the median count of the selected
            clients, so a client that claims more examples than it has gains at most
            a median client's weight. Needs the counts (``soft_merge(..., examples=)``);
            without them the gate weights are used. The no-harm check judges the
            reweighted merge.
        beat_constant: the no-harm check also rejects a merge whose gate-split
            cross-entropy is not below that of the best input-blind model, one that
            predicts the split's label frequencies for every input (their entropy;
            :func:`constant_prediction_loss`). Such a merge scores no better than a model
            that ignores its inputs, however close its loss is to the keep model's, and when the keep model
            is itself that uninformed (an untrained initial model, whose loss is about
            ln C), the margin above it lets it through: at 80% malicious, seed 2, the
            first round's sign-flipped updates, which stay near the initialisation,
            outscored the honest one-epoch specialists and merged into a model at chance
            (gate-split loss 2.301 against the keep model's 2.301 and the label
            entropy's 2.281), and the run stayed at chance for 30 rounds (docs/benchmarks.md, "Session 33"). The retry
            from closed client gates opens the candidates whose updates lower the loss at
            the keep model. If no start beats the bar: a keep model that beats it is
            returned; one that does not (a task that no round can yet lift above chance on
            the gate split) is replaced by the first merge within the margin, as without
            this option, so that training goes on (``GateReport.uninformed``). On by
            default; ignored when the split holds fewer than two classes (a constant is
            then perfect) or ``harm_margin`` is 0.
        uninformed_merge: what merges in such an uninformed round, where the gate split's
            loss cannot rank the candidates, so their update directions do, as FLTrust ranks
            them (Cao et al., NDSS 2021): the server trains a copy of the keep model on the
            gate split (``server_epochs``, ``server_lr``, ``server_batch_size``,
            ``server_momentum``: the clients' own training, as the paper's server does) and
            each candidate's trust is the ReLU of its update's cosine with the server's
            (:func:`direction_trust`). ``"aligned"`` (the default): the candidates with a
            positive cosine are merged with their example counts as weights, each capped at
            their median (:func:`example_count_weights`): FedAvg over the clients whose
            update points where the server's does (without ``examples`` passed to
            :func:`soft_merge`, their trust weighs them, as with ``"direction"``).
            ``"direction"``: the trust itself is each candidate's weight. Either merge is a
            weighted mean whatever ``mode`` is, and reads neither the clients' trust nor
            the mirror test. It must pass the no-harm margin (the candidates' weights are
            not rescaled), else the first merge within the margin stands, as with
            ``"first"`` (the rule of sessions 33–36: a merge gate learning made while
            nothing could score it), or, if no start was within the margin, the keep
            model is kept. The direction merge is also tried in that last case (every
            start over the margin of an uninformed keep model), which ``"first"`` answers
            with the keep model; a round that keeps an untrained model learns nothing.
            At alpha = 0.1, seed 1, 40% malicious, the old rule opened 4 to 11 of 20
            honest clients and left the run at chance for 16 rounds with no attack and
            for all 30 under sign-flip and min-max; with ``"aligned"`` the merge beat
            the bar from round 1 in six of seven cells, and the final round was 22, 51
            and 40 points higher in those three, 1–3 higher under ALIE and IPM, 14 higher
            under the backdoor (which got in either way), and 9.7 lower under label-flip;
            ``"direction"`` stayed at chance under IPM (docs/benchmarks.md, "Session 37").
        server_epochs, server_lr, server_batch_size, server_momentum: the server's SGD on
            the gate split for the direction trust; by default the default
            run's client training (3 epochs, lr 0.1, batch 16, momentum 0.9).
    """

    units: str | Sequence[str] = "model"
    mode: str = "weight"
    steps: int = 100
    lr: float = 0.1
    l0_lambda: float = 0.01
    batch_size: int = 128
    seed: int = 0
    include_keep: bool = True
    keep_mode: str = "anchor"
    warm_start: bool = True
    init_log_alpha: float = 2.0
    warm_start_temperature: float = 1.0
    warm_start_step: str = "candidate"
    warm_start_bend: float = 2.5
    warm_start_bend_quantile: float = 0.75
    merge_step_share: str = "all"
    warm_start_ceiling: bool = True
    mirror_test: bool = True
    mirror_temperature: float = 0.02
    mirror_confidence: float = 2.0
    mirror_specialist_ratio: float = 0.0
    mirror_flipped_ratio: float = 0.0
    mirror_trusted: float = 0.6
    merge_duplicates: bool = True
    near_duplicate_tolerance: float = 0.0
    max_grad_norm: float = 1.0
    tolerance: float = 0.01
    check_every: int = 10
    patience: int = 2
    threads: int = DEFAULT_THREADS
    max_candidates: int = 0
    trust_strength: float = 2.0
    harm_margin: float = 0.25
    example_weights: bool = False
    beat_constant: bool = True
    uninformed_merge: str = "aligned"
    server_epochs: int = 3
    server_lr: float = 0.1
    server_batch_size: int = 16
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.units, str):
            if self.units not in UNIT_KINDS:
                raise ValueError(f"units must be one of {UNIT_KINDS} or a list of name patterns, got {self.units!r}")
        elif not self.units or not all(isinstance(p, str) and p for p in self.units):
            raise ValueError("units as a list must hold non-empty name patterns")
        if self.mode not in MERGE_MODES:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {self.mode!r}")
        if self.keep_mode not in KEEP_MODES:
            raise ValueError(f"keep_mode must be one of {KEEP_MODES}, got {self.keep_mode!r}")
        _require(isinstance(self.steps, int) and self.steps >= 0, "steps must be an integer >= 0")
        _require(_finite(self.lr) and self.lr > 0, "lr must be a finite number > 0")
        _require(_finite(self.l0_lambda) and self.l0_lambda >= 0, "l0_lambda must be a finite number >= 0")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1")
        # The strategy adds the round number; torch's generators take seeds below 2**64.
        _require(isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)
                 and 0 <= self.seed < 2**63, "seed must be an integer in [0, 2**63)")
        _require(_finite(self.init_log_alpha), "init_log_alpha must be finite")
        _require(_finite(self.warm_start_temperature) and self.warm_start_temperature > 0,
                 "warm_start_temperature must be a finite number > 0")
        _require(isinstance(self.warm_start_ceiling, bool), "warm_start_ceiling must be a bool")
        _require(isinstance(self.mirror_test, bool), "mirror_test must be a bool")
        _require(_finite(self.mirror_temperature) and self.mirror_temperature > 0,
                 "mirror_temperature must be a finite number > 0")
        _require(_finite(self.mirror_confidence) and self.mirror_confidence >= 0,
                 "mirror_confidence must be a finite number >= 0")
        _require(_finite(self.mirror_specialist_ratio) and self.mirror_specialist_ratio >= 0,
                 "mirror_specialist_ratio must be a finite number >= 0")
        _require(_finite(self.mirror_flipped_ratio) and self.mirror_flipped_ratio >= 0,
                 "mirror_flipped_ratio must be a finite number >= 0")
        _require(_finite(self.mirror_trusted) and 0 <= self.mirror_trusted <= 1,
                 "mirror_trusted must be a number in [0, 1]")
        _require(isinstance(self.merge_duplicates, bool), "merge_duplicates must be a bool")
        _require(_finite(self.near_duplicate_tolerance) and self.near_duplicate_tolerance >= 0,
                 "near_duplicate_tolerance must be a finite number >= 0")
        _require(_finite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm must be a finite number > 0")
        _require(_finite(self.tolerance) and self.tolerance >= 0, "tolerance must be a finite number >= 0")
        _require(isinstance(self.check_every, int) and self.check_every >= 1, "check_every must be an integer >= 1")
        _require(isinstance(self.patience, int) and self.patience >= 1, "patience must be an integer >= 1")
        _require(isinstance(self.threads, int) and 0 <= self.threads <= MAX_THREADS,
                 f"threads must be an integer in [0, {MAX_THREADS}]")
        _require(isinstance(self.max_candidates, int) and self.max_candidates >= 0,
                 "max_candidates must be an integer >= 0")
        _require(_finite(self.trust_strength) and self.trust_strength >= 0,
                 "trust_strength must be a finite number >= 0")
        _require(_finite(self.harm_margin) and self.harm_margin >= 0, "harm_margin must be a finite number >= 0")
        _require(isinstance(self.example_weights, bool), "example_weights must be a bool")
        _require(not self.example_weights or self.mode == "weight", "example_weights needs mode 'weight'")
        _require(isinstance(self.beat_constant, bool), "beat_constant must be a bool")
        if self.warm_start_step not in WARM_START_STEPS:
            raise ValueError(f"warm_start_step must be one of {WARM_START_STEPS}, got {self.warm_start_step!r}")
        _require(_finite(self.warm_start_bend) and self.warm_start_bend >= 0,
                 "warm_start_bend must be a finite number >= 0")
        _require(_finite(self.warm_start_bend_quantile) and 0 <= self.warm_start_bend_quantile <= 1,
                 "warm_start_bend_quantile must be a number in [0, 1]")
        if self.merge_step_share not in MERGE_STEP_SHARES:
            raise ValueError(f"merge_step_share must be one of {MERGE_STEP_SHARES}, got {self.merge_step_share!r}")
        if self.uninformed_merge not in UNINFORMED_MERGES:
            raise ValueError(f"uninformed_merge must be one of {UNINFORMED_MERGES}, got {self.uninformed_merge!r}")
        _require(isinstance(self.server_epochs, int) and self.server_epochs >= 1,
                 "server_epochs must be an integer >= 1")
        _require(_finite(self.server_lr) and self.server_lr > 0, "server_lr must be a finite number > 0")
        _require(isinstance(self.server_batch_size, int) and self.server_batch_size >= 1,
                 "server_batch_size must be an integer >= 1")
        _require(_finite(self.server_momentum) and 0 <= self.server_momentum < 1,
                 "server_momentum must be a number in [0, 1)")


@dataclass(frozen=True)
class MergeUnit:
    """Tensor names that share one gate per candidate."""

    name: str
    tensor_names: tuple[str, ...]


@dataclass
class GateReport:
    """What one soft merge decided, and what it cost.

    ``gates[u][k]`` is the deterministic gate and ``weights[u][k]`` the mixing weight of
    candidate ``candidates[k]`` in unit ``units[u]``. Losses and accuracies are on the
    gate split: ``*_before`` for the keep candidate (the current global model),
    ``*_after`` for the merged model. ``candidate_losses`` are each candidate's own.
    ``duplicates`` lists the groups of identical (or, with
    ``near_duplicate_tolerance``, near-identical) candidates that shared one gate; each
    member reports the group's gate and an equal share of its weight. ``trust`` is each
    candidate's trust over past rounds (its group's, for identical candidates) when the
    caller passed one, else empty. ``rejected_loss`` is the gate-split loss of a first
    merge that the no-harm check rejected (``SoftMergeConfig.harm_margin`` and
    ``beat_constant``), else None; ``rejected_over_margin`` says which bar it failed:
    True for the margin, False when it was within the margin and only failed to beat the
    label frequencies. ``constant_loss`` is the label-frequency bar the check
    held merges to (None when ``beat_constant`` or the check is off, or the split has one
    class). Gates, weights and ``*_after`` describe the merge from the start named in
    ``start`` (``CLIENTS_START``, ``KEEP_START`` or ``CLOSED_START``), the one that
    passed the check, of ``attempts`` tried in turn (see ``SoftMergeConfig.keep_mode``
    and ``harm_margin`` for their order). ``uninformed`` is True when no start beat the
    label-frequency bar and the keep model did not either, so the first merge within the
    margin stands (``start`` names it), or, with ``uninformed_merge`` ``"aligned"`` (the
    default) or ``"direction"``, the direction merge (``DIRECTION_START``; its gates are 1
    where its weight is positive, ``log_alpha`` the replaced attempt's) when it passes the
    margin; ``uninformed`` is then False if the direction merge beats the bar.
    ``merge_step`` is True when the own-loss start and the mirror test scored each
    client at its step in an even merge (``SoftMergeConfig.warm_start_step``), and
    ``bend`` is the round's bend when ``warm_start_step`` is ``"auto"`` (else None).
    ``own_step_retry`` is True when such a round's merge-step starts before the closed one
    all harmed by more than the margin, so it was learned again from starts scored at each
    client's own step (their ``start`` names end in ``OWN_STEP_SUFFIX``); ``merge_step``
    stays True for it. ``open_share`` is k when ``merge_step_share`` is ``"open"`` and the
    round was scored again at 1/k, the client groups its first merge opened (None when it
    was not); the merge is the second one if its ``start`` ends in ``OPEN_SHARE_SUFFIX``.
    ``harm_fallback`` is True when the keep model was returned instead (every attempt
    failed the check, or there was no keep candidate to learn again from): ``weights``
    are then all on the keep candidate (shared with clients that resent it unchanged; all
    0 without a keep candidate), ``*_after`` equal ``*_before``, and ``gates``,
    ``log_alpha`` and ``start`` are the last attempt's. ``seconds`` is the whole merge's
    wall-clock time, ``gate_seconds`` the part spent learning gates (every attempt's
    steps and convergence checks), so that a step's cost is measured, not inferred.
    ``blind_tensors`` names the parameters with no gradient path to the gate-split loss
    (:func:`loss_blind_parameters`) that the merge left at the keep model's values (it does
    so only when that leaves the merge's loss and accuracy as measured); a unit of such
    parameters alone reports all its weight on the keep candidate and is in
    ``fallback_units``.
    """

    units: list[str]
    candidates: list[str]
    gates: list[list[float]]
    weights: list[list[float]]
    log_alpha: list[list[float]]
    candidate_losses: list[float]
    loss_before: float
    accuracy_before: float
    loss_after: float
    accuracy_after: float
    excluded: list[Exclusion] = field(default_factory=list)
    fallback_units: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    trust: list[float] = field(default_factory=list)
    rejected_loss: float | None = None
    rejected_over_margin: bool = False
    constant_loss: float | None = None
    uninformed: bool = False
    start: str = ""
    harm_fallback: bool = False
    merge_step: bool = False
    own_step_retry: bool = False
    open_share: int | None = None
    bend: float | None = None
    attempts: int = 1
    steps: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    gate_seconds: float = 0.0
    blind_tensors: list[str] = field(default_factory=list)

    def weight_on(self, labels: Sequence[str]) -> float:
        """Mean over units of the mixing weight that fell on the given candidates."""
        chosen = [k for k, label in enumerate(self.candidates) if label in set(labels)]
        if not self.units:
            return 0.0
        return sum(sum(row[k] for k in chosen) for row in self.weights) / len(self.units)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, digits: int = 2) -> str:
        """Weights as a text table: one row per candidate, one column per unit."""
        label_width = max([len(c) for c in self.candidates] + [9])
        widths = [max(len(u), digits + 3) for u in self.units]
        header = "candidate".ljust(label_width) + "  " + "  ".join(u.rjust(w) for u, w in zip(self.units, widths))
        rows = [header]
        for k, label in enumerate(self.candidates):
            cells = "  ".join(f"{self.weights[u][k]:.{digits}f}".rjust(w) for u, w in enumerate(widths))
            rows.append(label.ljust(label_width) + "  " + cells)
        for exclusion in self.excluded:
            rows.append(exclusion.label.ljust(label_width) + "  excluded: " + exclusion.reason)
        return "\n".join(rows)


def build_merge_units(model: nn.Module, units: str | Sequence[str] = "layer") -> list[MergeUnit]:
    """Group the model's parameters and buffers into merge units.

    Buffers (BatchNorm statistics and the like) belong to the unit of their module, so
    they follow that module's weights. With name patterns, each tensor goes to the first
    pattern that matches it and the unmatched ones form a last unit, ``rest``; a pattern
    that takes no tensor (a typo, or one that earlier patterns already covered) raises
    ValueError instead of leaving its tensors silently to ``rest``.
    """
    names = list(model.state_dict().keys())
    if units == "model":
        return [MergeUnit("model", tuple(names))]
    if units == "tensor":
        return _tied_together([MergeUnit(name, (name,)) for name in names], model)
    if units == "layer":
        grouped: dict[str, list[str]] = {}
        for name in names:
            module = name.rsplit(".", 1)[0] if "." in name else name
            grouped.setdefault(module, []).append(name)
        return _tied_together([MergeUnit(module, tuple(members)) for module, members in grouped.items()], model)
    remaining = list(names)
    result = []
    for pattern in units:
        members = [n for n in remaining if fnmatch.fnmatchcase(n, pattern)]
        if not members:
            raise ValueError(f"merge-unit pattern {pattern!r} matches no tensor of the model that an earlier "
                             f"pattern has not taken; the model's tensors are {names}")
        result.append(MergeUnit(pattern, tuple(members)))
        remaining = [n for n in remaining if n not in members]
    if remaining:
        result.append(MergeUnit("rest", tuple(remaining)))
    return _tied_together(result, model, patterns=True)


def _tied_together(units: list[MergeUnit], model: nn.Module, patterns: bool = False) -> list[MergeUnit]:
    """The units with every alias of a tied tensor moved into the unit of its first name.

    Tied names (an embedding shared with the output layer) are one tensor. In two units
    they would get two mixing weights and two merged values, and ``load_state_dict``
    keeps whichever comes last: not the model the no-harm check scored. Only names in
    the state dict count (a shared non-persistent buffer is in none). A unit left without
    tensors is dropped; with ``patterns``, that is an error, as for a pattern that takes nothing.
    """
    unit_of = {name: unit.name for unit in units for name in unit.tensor_names}
    aliases: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if name in unit_of:
            aliases.setdefault(id(tensor), []).append(name)
    order = {unit.name: position for position, unit in enumerate(units)}
    home = {}
    for group in aliases.values():
        if len(group) > 1:
            first = min((unit_of[name] for name in group), key=order.__getitem__)
            home.update({name: first for name in group})
    if not home:
        return units
    moved = []
    for unit in units:
        members = [name for name in unit.tensor_names if home.get(name, unit.name) == unit.name]
        members += [name for name, target in home.items() if target == unit.name and name not in members]
        if members:
            moved.append(MergeUnit(unit.name, tuple(members)))
        elif patterns:
            raise ValueError(f"merge-unit pattern {unit.name!r} takes only names tied to tensors of an earlier "
                             f"unit: {list(unit.tensor_names)}")
    return moved


def mixing_weights(
    gates: torch.Tensor,
    mode: str,
    fallback_index: torch.Tensor,
    straight_through: bool = True,
) -> torch.Tensor:
    """Per-unit mixing weights (U, K) from gates (U, K).

    ``fallback_index`` (U,) names the candidate a unit takes when all its gates are 0.
    """
    fallback = nn.functional.one_hot(fallback_index, gates.shape[-1]).to(gates.dtype)
    return _mix(gates, mode, fallback, straight_through)


def _mix(gates: torch.Tensor, mode: str, fallback: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
    """:func:`mixing_weights` with the fall-back given as one-hot rows (U, K)."""
    total = gates.sum(dim=-1, keepdim=True)
    dead = total <= 0
    if mode == "sum":
        weights = gates
    else:
        normalised = gates / total.clamp_min(torch.finfo(gates.dtype).tiny)
        if mode == "weight":
            weights = normalised
        else:
            hard = nn.functional.one_hot(gates.argmax(dim=-1), gates.shape[-1]).to(gates.dtype)
            # hard + (soft - soft) is exactly hard in the forward pass, so a one-hot
            # selection reproduces its candidate bit for bit, while the gradient is soft's.
            weights = hard + (normalised - normalised.detach()) if straight_through else hard
    return torch.where(dead, fallback, weights)


SELECTED_GATE = 0.5


def example_count_weights(gates: torch.Tensor, counts: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """Mixing weights (U, K) that select by gate and weigh by capped example count.

    With S_u = {k : z_uk > 1/2} the candidates selected in unit u, n_k candidate k's
    example count and m_u the median of n_k over the clients in S_u,

        w_uk = 1[k in S_u] * min(n_k, m_u) / sum_j 1[j in S_u] * min(n_j, m_u).

    FedAvg's weights over the selected clients, except that no count counts for more than
    the median selected one: counts are what clients claim, and the cap bounds what a
    false claim buys, as long as most selected clients are honest. A candidate without a
    count (``nan``: the keep model) weighs m_u. A unit that selects nothing, or only
    candidates without a usable count, keeps its row of ``gate_weights``.

    Args:
        gates: deterministic gates (U, K) in [0, 1].
        counts: example counts (K,), ``nan`` for a candidate that has none.
        gate_weights: the gates' own mixing weights (U, K), the fallback.
    """
    selected = gates > SELECTED_GATE
    known = ~torch.isnan(counts)
    weights = gate_weights.clone()
    for unit in range(gates.shape[0]):
        clients = selected[unit] & known
        if not bool(clients.any()):
            continue
        cap = torch.quantile(counts[clients].to(torch.float64), 0.5)
        prior = torch.where(known, torch.minimum(counts.to(torch.float64).nan_to_num(0.0), cap), cap)
        mass = torch.where(selected[unit], prior, torch.zeros_like(prior))
        if float(mass.sum()) > 0:
            weights[unit] = (mass / mass.sum()).to(weights.dtype)
    return weights


def _stack_dtype(reference: Mapping[str, torch.Tensor]) -> torch.dtype:
    # float64 holds every float32, float16 and bfloat16 value exactly, so a model with any
    # float64 tensor stacks in it and a one-hot selection stays bit for bit its candidate.
    float_dtypes = [t.dtype for t in reference.values() if t.dtype.is_floating_point]
    return torch.float64 if torch.float64 in float_dtypes else torch.float32


def _unit_groups(reference: Mapping[str, torch.Tensor], unit: MergeUnit,
                 buffer_names: set[str]) -> tuple[list[tuple[list[str], bool]], list[str]]:
    """A unit's floating tensors as (names, differentiable) groups, parameters first; and the rest."""
    floats = [n for n in unit.tensor_names if reference[n].dtype.is_floating_point]
    groups = [(names, differentiable)
              for names, differentiable in (([n for n in floats if n not in buffer_names], True),
                                            ([n for n in floats if n in buffer_names], False)) if names]
    return groups, [n for n in unit.tensor_names if n not in floats]


def _shared_rows(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], sizes: Sequence[int],
                 dtype: torch.dtype) -> torch.Tensor | None:
    """The (K, d) matrix whose row k the tensors ``names`` of ``states[k]`` already are, if any.

    :func:`stack_in_place` leaves candidates as views into such matrices; recognising
    them saves a copy of every candidate. Anything else returns None (and is copied).
    """
    width = sum(sizes)
    first = [state[names[0]] for state in states]
    if not all(isinstance(t, torch.Tensor) and t.dtype == dtype and not t.requires_grad for t in first):
        return None
    storage = first[0].untyped_storage()
    pointer = storage.data_ptr()
    base = first[0].storage_offset()
    stride = first[1].storage_offset() - base if len(first) > 1 else width
    if stride < width:
        return None
    for k, state in enumerate(states):
        offset = base + k * stride
        for name, size in zip(names, sizes):
            tensor = state[name]
            if (not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.requires_grad
                    or not tensor.is_contiguous() or tensor.numel() != size
                    or tensor.untyped_storage().data_ptr() != pointer or tensor.storage_offset() != offset):
                return None
            offset += size
    return torch.empty(0, dtype=dtype).set_(storage, base, (len(states), width), (stride, 1))


class _StackedCandidates:
    """Candidates stacked once per round: contiguous (K, d) matrices per unit.

    Each unit has one matrix for its floating-point parameters and one for its
    floating-point buffers. Buffers (BatchNorm statistics) follow the unit's mixing
    weights but carry no gradient: batch norm cannot differentiate through them.
    Candidates that :func:`stack_in_place` already laid out are used without a copy.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
                 units: Sequence[MergeUnit], buffer_names: set[str]) -> None:
        self.reference = reference
        self.states = states
        self.dtype = _stack_dtype(reference)
        self.copied = False
        # Per unit: [(layout, sizes, matrix, differentiable)], the layout naming each
        # tensor's (name, shape, dtype if not the stack's), and the names that cannot be mixed.
        self.groups: list[list[tuple[list, list[int], torch.Tensor, bool]]] = []
        self.other_names: list[list[str]] = []
        for unit in units:
            groups, others = _unit_groups(reference, unit, buffer_names)
            stacked = []
            for names, differentiable in groups:
                sizes = [reference[n].numel() for n in names]
                matrix = _shared_rows(states, names, sizes, self.dtype)
                if matrix is None:
                    self.copied = True
                    matrix = torch.empty((len(states), sum(sizes)), dtype=self.dtype)
                    for k, state in enumerate(states):
                        torch.cat([state[n].detach().reshape(-1).to(self.dtype) for n in names], out=matrix[k])
                layout = [(n, tuple(reference[n].shape),
                           reference[n].dtype if reference[n].dtype != self.dtype else None)
                          for n in names]
                stacked.append((layout, sizes, matrix, differentiable))
            self.groups.append(stacked)
            self.other_names.append(others)

    def merge(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for mixing weights (U, K); differentiable in ``weights``.

        One vector-matrix product per (unit, group): sum_k w_uk * theta_uk for all of
        the unit's tensors at once.
        """
        merged: dict[str, torch.Tensor] = {}
        if weights.dtype != self.dtype:
            weights = weights.to(self.dtype)
        for u, groups in enumerate(self.groups):
            row = weights[u]
            for layout, sizes, matrix, differentiable in groups:
                flat = (row if differentiable else row.detach()) @ matrix
                pieces = flat.split(sizes) if len(sizes) > 1 else (flat,)
                for (name, shape, dtype), piece in zip(layout, pieces):
                    piece = piece.view(shape)
                    merged[name] = piece if dtype is None else piece.to(dtype)
            if self.other_names[u]:
                # Integer buffers (batch counters) cannot be mixed: take the top candidate's.
                top = int(row.argmax())
                for name in self.other_names[u]:
                    merged[name] = self.states[top][name]
        return merged


def stack_in_place(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    keep: Mapping[str, torch.Tensor] | None = None,
    units: str | Sequence[str] = "layer",
) -> dict[str, torch.Tensor] | None:
    """Move decoded candidates into the layout :func:`soft_merge` gates on, without a second copy.

    For every (merge unit, parameter or buffer group) one (K [+1], d) matrix is made;
    candidate k's tensors are copied into row k and ``states[k]`` is replaced (in the
    list) by a dict of views of that row. A caller that holds no other reference to the
    old tensors frees each candidate as soon as it has been moved, so peak memory stays
    near one copy of the candidates rather than two. ``keep`` (not modified) is placed
    in the last row, and its view dict returned, to be passed as ``soft_merge(keep=...)``.

    Only candidates that match the model (names, shapes, dtypes) are moved; the rest are
    left as they were for :func:`soft_merge` to exclude. Values are not changed, so the
    merge is the same with or without this step: it only saves memory and a copy.
    """
    reference = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    dtype = _stack_dtype(reference)
    rows = [i for i, state in enumerate(states) if _same_layout(reference, state)]
    if keep is not None and not _same_layout(reference, keep):
        raise ValueError("the keep state does not match the model")
    sources = [states[i] for i in rows] + ([keep] if keep is not None else [])
    if not sources:
        return dict(keep) if keep is not None else None
    buffer_names = model_buffer_names(model)
    matrices = []
    for unit in build_merge_units(model, units):
        for names, _ in _unit_groups(reference, unit, buffer_names)[0]:
            if all(reference[n].dtype == dtype for n in names):
                sizes = [reference[n].numel() for n in names]
                # torch.empty reserves the pages; they become resident row by row, as the
                # old tensors are released.
                matrices.append((names, sizes, torch.empty((len(sources), sum(sizes)), dtype=dtype)))
    moved: list[dict[str, torch.Tensor]] = []
    for row, source in enumerate(sources):
        view = dict(source)
        for names, sizes, matrix in matrices:
            offset = 0
            for name, size in zip(names, sizes):
                target = matrix[row, offset:offset + size]
                target.copy_(torch.as_tensor(source[name]).reshape(-1))
                view[name] = target.view(reference[name].shape)
                offset += size
        if row < len(rows):
            states[rows[row]] = view
        else:
            moved.append(view)
        sources[row] = None  # the list must not keep the old tensors alive
    return moved[0] if moved else None


def duplicate_groups(states: Sequence[Mapping[str, torch.Tensor]], first: int | None = None) -> list[list[int]]:
    """Indices of bit-for-bit identical states, grouped; every index is in exactly one group.

    Groups keep the order of their first member, and members their order, except that
    ``first`` (the keep candidate) leads its group. Candidates are bucketed by the float64
    sum of each floating tensor (one pass over the weights, O(K d)) and only candidates in
    one bucket are compared exactly, so honest rounds, where no two sums agree, compare
    nothing.
    """
    buckets: dict[tuple, list[list[int]]] = {}
    groups: list[list[int]] = []
    order = list(range(len(states)))
    if first is not None:
        order.insert(0, order.pop(first))
    for k in order:
        state = states[k]
        # By name, not in the order a reply listed its arrays: reordering must not split copies.
        key = tuple(float(t.detach().sum(dtype=torch.float64)) if t.dtype.is_floating_point else int(t.sum())
                    for _, t in sorted(state.items()))
        for group in buckets.setdefault(key, []):
            other = states[group[0]]
            if all(torch.equal(state[name], other[name]) for name in state):
                group.append(k)
                break
        else:
            group = [k]
            buckets[key].append(group)
            groups.append(group)
    groups.sort(key=lambda group: min(group))
    return groups


def loss_rms(difference: torch.Tensor) -> float:
    """Root mean square of a difference of per-example losses; +inf when it is not finite."""
    value = float(difference.pow(2).mean().sqrt()) if len(difference) else 0.0
    return value if math.isfinite(value) else math.inf


def near_duplicate_clusters(losses: Sequence[torch.Tensor | None], keep_losses: torch.Tensor,
                            tolerance: float) -> list[list[int]]:
    """Indices of candidates that behave alike on the gate split, clustered; each index in one cluster.

    ``losses[g]`` is candidate g's per-example gate-split cross-entropy (``None`` for the
    keep candidate, which is never clustered), ``keep_losses`` the keep model's. With
    ``r(a, b) = rms(losses[a] - losses[b])`` and ``m(a) = rms(losses[a] - keep_losses)``
    (how far a moved the model on the gate split), candidate g joins the first cluster
    whose leader h has ``r(g, h) <= tolerance * min(m(g), m(h))``, or leads a new one.
    Comparing with the leader only bounds a cluster's spread (no chains of near pairs
    linking unlike candidates); the loss space makes the test about what a model does,
    so noise that does not change a copy's predictions does not make it a new candidate,
    while honest clients trained on different data err on different examples. Clusters
    keep the order of their first member. A candidate whose losses did not move from the
    keep model's (m = 0, no scale to compare with) or are not finite never clusters.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0; got {tolerance}")
    clusters: list[list[int]] = []
    leaders: list[tuple[torch.Tensor, float] | None] = []  # None: a cluster nothing joins
    for g, own in enumerate(losses):
        moved = loss_rms(own - keep_losses) if own is not None else math.inf
        if own is None or not (math.isfinite(moved) and moved > 0):
            clusters.append([g])
            leaders.append(None)
            continue
        for cluster, leader in zip(clusters, leaders):
            if leader is not None and loss_rms(own - leader[0]) <= tolerance * min(moved, leader[1]):
                cluster.append(g)
                break
        else:
            clusters.append([g])
            leaders.append((own, moved))
    return clusters


def mean_state(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating tensors across ``states``; other tensors are the first state's."""
    first = states[0]
    return {name: (torch.stack([state[name] for state in states]).double().mean(0).to(tensor.dtype)
                   if tensor.dtype.is_floating_point else tensor)
            for name, tensor in first.items()}


def _is_flag(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def _same_layout(reference: Mapping[str, torch.Tensor], state: Mapping[str, object]) -> bool:
    return (isinstance(state, Mapping) and set(state) == set(reference)
            and all(isinstance(state[n], torch.Tensor) and state[n].shape == t.shape and state[n].dtype == t.dtype
                    for n, t in reference.items()))


def evaluate_state(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                   targets: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` with ``state`` swapped in.

    A non-finite loss is reported as +inf rather than NaN, so that callers can rank it.
    """
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(targets), batch_size):
            x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
            # Every name is given (a tied alias as its own tensor), so tied weights need no untying.
            logits = functional_call(model, dict(state), (x,), tie_weights=False)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == y).sum())
    count = max(len(targets), 1)
    loss = total_loss / count
    return (loss if math.isfinite(loss) else math.inf), correct / count


def mirror_state(candidate: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor],
                 buffers: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The candidate reflected through the keep model: 2 * keep - candidate (floating tensors).

    Floating tensors named in ``buffers`` (BatchNorm's running statistics) take the keep
    model's values instead: they are estimates, not a step, and reflected a variance can
    fall below 0 (a candidate's more than twice the keep model's), which made the mirror's
    loss NaN and so switched the mirror test off for that candidate.
    """
    return {name: tensor if not tensor.dtype.is_floating_point
            else keep[name] if name in buffers else 2 * keep[name] - tensor
            for name, tensor in candidate.items()}


def model_buffer_names(model: nn.Module) -> frozenset[str]:
    """The state-dict names of the model's buffers (aliases included)."""
    return frozenset(name for name, _ in model.named_buffers(remove_duplicate=False))


def loss_blind_parameters(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                          targets: torch.Tensor, chunk: int = BLIND_PROBE_CHUNK) -> list[str]:
    """The floating parameters with no gradient path to the model's loss on ``inputs``, in its current mode.

    Found by autograd over every example (in chunks): a parameter the loss never reaches
    gets no gradient (``None``, not a zero). A train-only head (Inception's auxiliary
    classifier) or an unused layer is one in eval mode: the split cannot tell an honest
    value of it from an extreme one. A parameter read without a gradient (a hard
    router, ``.detach()``) is found too, though the loss does read it; the merge
    therefore checks that leaving such parameters at the keep model's values changes
    nothing it measured before it does so.
    """
    state_names = set(state)
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in state_names and state[name].dtype.is_floating_point:
            aliases.setdefault(id(parameter), []).append(name)
    # Leaves that share the state's storage: gradients need a leaf, not a copy.
    leaves = {name: state[name].detach().requires_grad_(True) for names in aliases.values() for name in names}
    reached: set[str] = set()
    if not leaves or len(targets) == 0:
        return []
    with torch.enable_grad():
        for start in range(0, len(targets), chunk):
            unreached = [name for name in leaves if name not in reached]
            if not unreached:
                break
            logits = functional_call(model, {**state, **leaves}, (inputs[start:start + chunk],), tie_weights=False)
            loss = nn.functional.cross_entropy(logits, targets[start:start + chunk])
            gradients = torch.autograd.grad(loss, [leaves[name] for name in unreached], allow_unused=True)
            reached.update(name for name, gradient in zip(unreached, gradients) if gradient is not None)
    # A tied tensor is one parameter: blind only if no alias of it reaches the loss.
    return [name for names in aliases.values() if not reached.intersection(names) for name in names]


def per_example_losses(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                       targets: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """The cross-entropy of each example under ``model`` with ``state`` swapped in (float64).

    ``batch_size`` examples go through at a time; by default the split goes in the fewest
    chunks of at most ``SCORING_CHUNK_VALUES`` input values (at least ``MIN_SCORING_CHUNK``
    examples), cut as evenly as they go.
    """
    if len(targets) == 0:
        return torch.zeros(0, dtype=torch.float64)
    if batch_size is None:
        per_chunk = max(MIN_SCORING_CHUNK, SCORING_CHUNK_VALUES // max(1, inputs[0].numel()))
        chunks = math.ceil(len(targets) / per_chunk)
        pieces = list(zip(inputs.tensor_split(chunks), targets.tensor_split(chunks)))
    else:
        pieces = [(inputs[start:start + batch_size], targets[start:start + batch_size])
                  for start in range(0, len(targets), batch_size)]
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(functional_call(model, dict(state), (x,), tie_weights=False), y,
                                              reduction="none").double()
                  for x, y in pieces]
    return torch.cat(losses)


def constant_prediction_loss(targets: torch.Tensor) -> float | None:
    """The cross-entropy of the best input-blind model on these targets, or None for one class.

    A model that predicts the same distribution p for every input scores
    -sum_c f_c log p_c, least at p = f, the label frequencies: their entropy
    H(f) = -sum_c f_c log f_c. With fewer than two classes H is 0, and no bar is set.
    """
    counts = torch.unique(targets, return_counts=True)[1].double()
    if len(counts) < 2:
        return None
    frequencies = counts / counts.sum()
    return float(-(frequencies * frequencies.log()).sum())


def direction_trust(model: nn.Module, keep: Mapping[str, torch.Tensor],
                    states: Sequence[Mapping[str, torch.Tensor]], validation: tuple[torch.Tensor, torch.Tensor],
                    config: SoftMergeConfig) -> torch.Tensor:
    """FLTrust's trust of each state's update: TS_k = ReLU(cos(theta_k - theta_keep, g_0)).

    g_0 is the server's own update, ``config.server_epochs`` of SGD from ``keep`` on
    ``validation`` (:func:`softmerge.aggregation.robust.fltrust_server_model`, seeded
    with ``config.seed``); Cao et al., NDSS 2021. Cosines are over the model's
    parameters: buffers (BatchNorm statistics) carry no direction. Returns (K,) float64
    in [0, 1], all 0 when g_0 is 0 or not finite. ``model`` is not modified.

    Each cosine is accumulated tensor by tensor in float64, so the memory beyond the
    states themselves is one float64 copy of the model (g_0) and one tensor at a time,
    whatever K (:func:`softmerge.aggregation.robust.fltrust_trust_scores`, the same formula on a
    stacked (K, d) matrix, would hold K copies).
    """
    trained, _ = fltrust_server_model(model, keep, validation, epochs=config.server_epochs,
                                      learning_rate=config.server_lr, batch_size=config.server_batch_size,
                                      momentum=config.server_momentum, seed=config.seed)
    names = [name for name, _ in model.named_parameters()]

    def as_float64(tensor: object) -> torch.Tensor:
        return torch.as_tensor(tensor).detach().to(torch.float64)

    server_update = {name: as_float64(trained[name]) - as_float64(keep[name]) for name in names}
    server_norm = math.sqrt(sum(float(update.square().sum()) for update in server_update.values()))
    scores = torch.zeros(len(states), dtype=torch.float64)
    if not math.isfinite(server_norm) or server_norm == 0.0:
        return scores
    for k, state in enumerate(states):
        dot = squared = 0.0
        for name in names:
            update = as_float64(state[name]) - as_float64(keep[name])
            dot += float((update * server_update[name]).sum())
            squared += float(update.square().sum())
        norm = math.sqrt(squared)
        if norm > 0 and math.isfinite(norm) and math.isfinite(dot):
            scores[k] = min(1.0, max(0.0, dot / (norm * server_norm)))
    return scores


def _mean_loss(losses: torch.Tensor) -> float:
    """Mean of per-example losses; +inf rather than NaN when it is not finite, so that it ranks."""
    mean = float(losses.mean()) if len(losses) else 0.0
    return mean if math.isfinite(mean) else math.inf


def mirror_statistics(model: nn.Module, candidate: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor],
                      inputs: torch.Tensor, targets: torch.Tensor, batch_size: int | None = None,
                      own_losses: torch.Tensor | None = None,
                      reflected_losses: torch.Tensor | None = None) -> tuple[float, float]:
    """The mirror image's mean loss, and the standard error of d's per-example differences.

    d_i = CE(f(x_i; candidate), y_i) - CE(f(x_i; 2 keep - candidate), y_i) over the gate
    split; the standard error is std(d_i) / sqrt(n). Non-finite differences give an
    infinite standard error (nothing is significant about them; the own-loss start and the
    bound's own guards handle such candidates). ``own_losses``, the candidate's
    :func:`per_example_losses` if the caller has them, saves its forward pass, and
    ``reflected_losses``, the mirror image's, saves the mirror's.
    """
    own = own_losses if own_losses is not None else per_example_losses(model, candidate, inputs, targets, batch_size)
    reflected = reflected_losses
    if reflected is None:
        reflected = per_example_losses(model, mirror_state(candidate, keep, model_buffer_names(model)), inputs,
                                       targets, batch_size)
    difference = own - reflected
    error = float(difference.std()) / math.sqrt(len(difference)) if len(difference) > 1 else 0.0
    return _mean_loss(reflected), (error if math.isfinite(error) else math.inf)


def merge_step_losses(model: nn.Module, candidate: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor],
                      keep_losses: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                      share: int, mirror: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example losses of the candidate's step inside an even merge of ``share``, and of its mirror.

    The states scored are keep + delta / share and keep - delta / share (delta = candidate
    - keep, floating tensors only); each example's loss change against ``keep_losses`` is
    multiplied by ``share``, so the scores read in the units of the candidate's own
    (``SoftMergeConfig.warm_start_step``). Without ``mirror`` the mirror's are None.
    """
    stepped = {name: keep[name] + (tensor - keep[name]) / share if tensor.dtype.is_floating_point else tensor
               for name, tensor in candidate.items()}
    own = per_example_losses(model, stepped, inputs, targets)
    scaled = keep_losses + share * (own - keep_losses)
    if not mirror:
        return scaled, None
    reflected = per_example_losses(model, mirror_state(stepped, keep, model_buffer_names(model)), inputs, targets)
    return scaled, keep_losses + share * (reflected - keep_losses)


def update_bend(own_losses: torch.Tensor, reflected_losses: torch.Tensor, keep_loss: float) -> float:
    """How far an update bends the gate-split loss: the mean rise of the update and its mirror image.

    b = (L(keep + delta) + L(keep - delta)) / 2 - L(keep), mean losses on the gate split.
    To second order b = delta^T H delta / 2, the same for an update and its sign flip, so
    flipping updates does not move it; a client whose data hold few classes overshoots
    both ways, by nats. +inf when not finite.
    """
    bend = (_mean_loss(own_losses) + _mean_loss(reflected_losses)) / 2 - keep_loss
    return bend if math.isfinite(bend) else math.inf


def round_bend(bends: Sequence[float], clients: Sequence[int], quantile: float) -> float | None:
    """The ``quantile`` of the finite bends, each counted once per client that sent it.

    (Linear interpolation, as ``numpy.quantile``.) Identical replies are scored once but
    stand for every sender (``clients``). None when no bend is finite: an update whose own
    or mirror loss overflows says nothing about the federation's heterogeneity.
    """
    values = [bend for bend, count in zip(bends, clients) for _ in range(count) if math.isfinite(bend)]
    if not values:
        return None
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), quantile))


def best_class_gain(losses: torch.Tensor, keep_losses: torch.Tensor, targets: torch.Tensor) -> float:
    """The largest reduction of one class's mean loss against the keep model's (negative if any).

    min over the classes c in ``targets`` of mean_{i: y_i = c} (losses_i - keep_losses_i);
    +inf when that is not finite (an overflowing candidate specialises in nothing).
    """
    change = losses - keep_losses
    gains = [float(change[targets == label].mean()) for label in torch.unique(targets)]
    best = min(gains) if gains else math.inf
    return best if math.isfinite(best) else math.inf


def is_specialist(own_gain: float, mirror_gain: float, ratio: float) -> bool:
    """Whether a candidate lowers one class's loss ``ratio`` times as much as its mirror image does any.

    (``SoftMergeConfig.mirror_specialist_ratio``.) False when the candidate lowers no class's
    loss, or ``ratio`` is 0; true when it lowers one and its mirror image lowers none.
    """
    if not ratio > 0 or not own_gain < 0:
        return False
    return not mirror_gain < 0 or own_gain <= ratio * mirror_gain


def is_flipped(own_gain: float, mirror_gain: float, ratio: float) -> bool:
    """Whether a candidate's mirror image lowers one class's loss ``ratio`` times as much as it does any.

    (``SoftMergeConfig.mirror_flipped_ratio``; :func:`is_specialist` with the two swapped.)
    False when the mirror image lowers no class's loss, or ``ratio`` is 0.
    """
    return is_specialist(mirror_gain, own_gain, ratio)


def mirror_log_alpha(losses: Sequence[float], mirror_losses: Sequence[float], config: SoftMergeConfig,
                     standard_errors: Sequence[float] | None = None,
                     spared: Sequence[bool] | None = None,
                     flipped: Sequence[bool] | None = None) -> torch.Tensor:
    """The mirror test's bound on the starting log_alpha (see ``SoftMergeConfig.mirror_test``).

    d = own loss - mirror loss; the bound is LOG_ALPHA_CLOSED - d / mirror_temperature. A
    candidate whose own loss is not finite is closed; one whose mirror loss is not finite
    (while its own is) has descended from an astronomical mirror and is not bounded here.
    With ``config.mirror_confidence`` z > 0 and the standard errors of d given, only a d
    above z standard errors is bounded. A candidate marked in ``spared`` (a specialist,
    ``config.mirror_specialist_ratio``, or a trusted client, ``config.mirror_trusted``) with
    a finite loss is not bounded. One marked in ``flipped`` (``config.mirror_flipped_ratio``)
    is bounded at or below the closed threshold, spared or not, significant or not.
    """
    z = config.mirror_confidence
    errors = standard_errors if standard_errors is not None else [0.0] * len(losses)
    exempt = spared if spared is not None else [False] * len(losses)
    suspect = flipped if flipped is not None else [False] * len(losses)
    bounds = []
    for loss, mirror, error, spare, flip in zip(losses, mirror_losses, errors, exempt, suspect):
        if not math.isfinite(loss):
            bounds.append(LOG_ALPHA_MIN)
        elif flip:
            difference = loss - mirror if math.isfinite(mirror) else 0.0
            bounds.append(LOG_ALPHA_CLOSED - max(difference, 0.0) / config.mirror_temperature)
        elif (spare or not math.isfinite(mirror)
              or (z > 0 and standard_errors is not None and not loss - mirror > z * error)):
            bounds.append(-LOG_ALPHA_MIN)
        else:
            bounds.append(LOG_ALPHA_CLOSED - (loss - mirror) / config.mirror_temperature)
    return torch.tensor(bounds, dtype=torch.float32).clamp(LOG_ALPHA_MIN, -LOG_ALPHA_MIN)


def warm_start_log_alpha(losses: Sequence[float], config: SoftMergeConfig) -> torch.Tensor:
    """Initial log_alpha per candidate from each candidate's own validation loss.

    The best candidate starts at ``init_log_alpha``; every nat of extra loss costs
    ``1 / warm_start_temperature``. Non-finite losses start at the closed floor.
    """
    finite = [loss for loss in losses if math.isfinite(loss)]
    best = min(finite) if finite else 0.0
    start = []
    for loss in losses:
        if not config.warm_start:
            start.append(config.init_log_alpha)
        elif not math.isfinite(loss):
            start.append(LOG_ALPHA_MIN)
        else:
            value = config.init_log_alpha - (loss - best) / config.warm_start_temperature
            start.append(max(LOG_ALPHA_MIN, min(config.init_log_alpha, value)))
    return torch.tensor(start, dtype=torch.float32)


def checked_split(model: nn.Module, split: object, name: str = "validation",
                  probe: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's labelled split as the merge reads it, or a ValueError that says what is wrong.

    ``split`` must be ``(inputs, labels)``: as many inputs as labels, floating-point inputs
    of the dtype of the model's floating parameters (or integer ones, such as token ids),
    and labels that are class indices (a 1-D integer tensor; any integer dtype is widened
    to int64, the one cross-entropy takes).
    With ``probe``, the model is run (in eval mode, without gradients) on up to two inputs,
    and the labels must be indices into its output's last dimension. Every defect found
    here would otherwise surface as a torch error in the first round's merge, after every
    client has trained.
    """
    if not (isinstance(split, Sequence) and len(split) == 2
            and all(isinstance(part, torch.Tensor) for part in split)):
        raise ValueError(f"the {name} split must be a pair of tensors (inputs, labels), got {type(split).__name__}")
    inputs, labels = split
    if inputs.dim() < 1 or labels.dim() != 1 or len(inputs) != len(labels):
        raise ValueError(f"the {name} split must hold one label per input (1-D labels); got inputs of shape "
                         f"{tuple(inputs.shape)} and labels of shape {tuple(labels.shape)}")
    if len(labels) == 0:
        # With nothing to judge by, the gates would learn nothing and every candidate, extreme or not, would be merged.
        raise ValueError(f"the {name} split is empty: the server needs clean labelled examples to judge the "
                         "clients' models by")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"the {name} split's labels must be class indices (an integer tensor), got {labels.dtype}")
    # Integer inputs (token ids into an embedding) are the model's to read; the probe says if it cannot.
    parameter_dtypes = {parameter.dtype for parameter in model.parameters() if parameter.dtype.is_floating_point}
    if inputs.dtype.is_floating_point and parameter_dtypes and inputs.dtype not in parameter_dtypes:
        raise ValueError(f"the {name} split's inputs are {inputs.dtype} but the model's parameters are "
                         f"{', '.join(sorted(str(dtype) for dtype in parameter_dtypes))}; convert the inputs")
    labels = labels.long()
    if probe:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(inputs[:2])
        except Exception as error:  # noqa: BLE001  (any failure here is the split's or the model's, said plainly)
            raise ValueError(f"the model cannot run on the {name} split's inputs of shape "
                             f"{tuple(inputs.shape[1:])}: {type(error).__name__}: {error}") from error
        finally:
            model.train(was_training)
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(f"the model must return (batch, classes) logits on the {name} split, got {shape}")
        classes = outputs.shape[-1]
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise ValueError(f"the {name} split's labels must lie in [0, {classes}) for a model with {classes} "
                             f"outputs; got labels from {int(labels.min())} to {int(labels.max())}")
    return inputs, labels


def soft_merge(
    model: nn.Module,
    candidates: Sequence[Mapping[str, object]],
    validation: tuple[torch.Tensor, torch.Tensor],
    config: SoftMergeConfig | None = None,
    keep: Mapping[str, torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
    initial_log_alpha: torch.Tensor | None = None,
    trust: Sequence[float] | None = None,
    examples: Sequence[float] | None = None,
    recorded: Sequence[bool] | None = None,
    record_held: bool | None = None,
) -> tuple[dict[str, torch.Tensor], GateReport]:
    """Merge candidate models by learning hard-concrete gates on a validation set.

    Args:
        model: the architecture. Its current state is the keep candidate unless ``keep``
            is given. It is only read: its weights are never modified.
        candidates: state dicts (name -> tensor or numpy array) of the client models.
        validation: ``(inputs, targets)`` of the gate split, a small clean labelled set.
        config: see :class:`SoftMergeConfig`.
        keep: the current global model, if not the model's own state.
        labels: a name per candidate, for the report.
        initial_log_alpha: optional (U, K) start for log_alpha, K counting the gated
            candidates (after exclusion and pre-selection) and the keep candidate last;
            it replaces the warm start.
        trust: optional trust per candidate (in ``candidates``' order), from the clients'
            records over past rounds (:mod:`softmerge.aggregation.trust`). Below 1/2 it
            lowers the candidate's start by ``config.trust_strength`` times its log-odds;
            the warm-start ceiling stays where the candidate's own evidence puts it.
        examples: optional example count per candidate (in ``candidates``' order), as
            the clients report them; read with ``config.example_weights`` and by the
            ``"aligned"`` merge of an uninformed round (``config.uninformed_merge``).
        recorded: optional, per candidate, whether its trust comes from a record (False:
            a newcomer, at the neutral 1/2). Read with ``trust`` by ``config.mirror_trusted``
            alone: a newcomer is spared the mirror test only in a round in which no valid
            candidate has a record (a malformed one's does not count; one that
            pre-selection drops does). None treats every candidate as recorded.
        record_held: with ``recorded``, whether the caller holds a record of any client
            at all, replying this round or not (a federation past its first recorded
            round). True tests this round's newcomers even when none of its candidates
            has a record (a round of new node IDs alone, after a SuperLink lost its
            database); None reads it from ``recorded``.

    Returns:
        The merged state dict (same names, shapes and dtypes as ``model.state_dict()``)
        and a :class:`GateReport`.
    """
    config = config or SoftMergeConfig()
    started = time.perf_counter()
    with _torch_threads(config.threads):
        merged, report = _soft_merge(model, candidates, validation, config, keep, labels, initial_log_alpha, trust,
                                     examples, recorded, record_held)
    report.seconds = time.perf_counter() - started
    return merged, report


@contextmanager
def _torch_threads(threads: int):
    """Run with ``threads`` torch intra-op threads (0: unchanged), restoring the setting after."""
    previous = torch.get_num_threads()
    if threads and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _soft_merge(model, candidates, validation, config, keep, labels, initial_log_alpha, trust, examples, recorded,
                record_held=None):
    # Cheap checks every call; the strategies run the model on the split once, when built.
    inputs, targets = checked_split(model, validation, probe=False)
    reference = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    labels = list(labels) if labels is not None else [f"candidate-{i}" for i in range(len(candidates))]
    if len(labels) != len(candidates):
        raise ValueError(f"got {len(labels)} labels for {len(candidates)} candidates")
    if trust is not None:
        trust = [float(value) for value in trust]
        if len(trust) != len(candidates) or not all(0.0 <= value <= 1.0 for value in trust):
            raise ValueError(f"trust must hold one value in [0, 1] per candidate ({len(candidates)})")
    if recorded is not None:
        # A flag read as truthy text or a trust value would silently spare a newcomer.
        flags = list(recorded) if isinstance(recorded, Sequence) and not isinstance(recorded, str) else None
        if flags is None or len(flags) != len(candidates) or not all(_is_flag(value) for value in flags):
            raise ValueError(f"recorded must hold one True or False per candidate ({len(candidates)}), "
                             f"got {recorded!r}")
        recorded = [bool(value) for value in flags]
    if examples is not None:
        examples = [float(value) for value in examples]
        if len(examples) != len(candidates) or not all(math.isfinite(value) and value >= 0 for value in examples):
            raise ValueError(f"examples must hold one finite count >= 0 per candidate ({len(candidates)})")

    valid_indices, excluded = validate_candidates(reference, candidates, labels)
    states = [as_tensor_state(candidates[i]) for i in valid_indices]
    gated_labels = [labels[i] for i in valid_indices]
    keep_problem = candidate_problem(reference, keep) if keep is not None else None
    if keep_problem:
        raise ValueError(f"the keep state does not match the model: {keep_problem}")
    keep_state = as_tensor_state(keep) if keep is not None else reference

    units = build_merge_units(model, config.units)
    unit_names = [unit.name for unit in units]
    model_buffers = model_buffer_names(model)
    was_training = model.training
    model.eval()
    try:
        loss_before, accuracy_before = evaluate_state(model, keep_state, inputs, targets)
        if not states and not config.include_keep:
            report = GateReport(unit_names, [], [[] for _ in units], [[] for _ in units], [[] for _ in units], [],
                                loss_before, accuracy_before, loss_before, accuracy_before, excluded,
                                fallback_units=unit_names)
            return {name: tensor.clone() for name, tensor in keep_state.items()}, report
        blind = loss_blind_parameters(model, keep_state, inputs, targets)

        clients = len(states)
        # The trust of each gated state; the keep candidate is not a client and has no record.
        state_trust = [trust[i] for i in valid_indices] if trust is not None else [NEUTRAL_TRUST] * clients
        # The trust the mirror test's sparing reads: a newcomer's neutral trust is no record,
        # and once anyone in the round has one, a newcomer is tested (trust 0 here), or a
        # client could shed the test by coming back under a new identity. In a round of
        # newcomers alone (a federation's first) nobody can be told apart by record.
        someone_recorded = recorded is not None and (
            bool(record_held) if record_held is not None else any(recorded[i] for i in valid_indices))
        sparing_trust = [trust[i] if trust is not None and (not someone_recorded or recorded[i]) else 0.0
                         for i in valid_indices]
        # The keep model is not a client and has no count (nan).
        state_examples = [examples[i] for i in valid_indices] if examples is not None else [math.nan] * clients
        keep_index = None
        if config.include_keep:
            keep_index = clients
            states.append(keep_state)
            gated_labels.append(KEEP_LABEL)
            state_trust.append(NEUTRAL_TRUST)
            sparing_trust.append(NEUTRAL_TRUST)
            state_examples.append(math.nan)
        # Identical candidates are gated as one, and scored once: IPM's or min-max's many
        # copies of one reply cost one forward pass, not one per sender.
        groups = (duplicate_groups(states, keep_index) if config.merge_duplicates
                  else [[k] for k in range(len(states))])
        # Per-example losses per group, None for the keep candidate's (its loss is loss_before).
        group_losses = [None if group[0] == keep_index else per_example_losses(model, states[group[0]], inputs, targets)
                        for group in groups]
        candidate_losses = [math.inf] * len(states)
        for group, losses in zip(groups, group_losses):
            for k in group:
                candidate_losses[k] = loss_before if losses is None else _mean_loss(losses)

        if config.max_candidates and clients > config.max_candidates:
            chosen = _preselect(candidate_losses[:clients], config.max_candidates)
            dropped = sorted(set(range(clients)) - set(chosen))
            excluded = excluded + [
                Exclusion(valid_indices[k], gated_labels[k],
                          f"pre-selection: own gate-split loss {candidate_losses[k]:.4g} is not among the "
                          f"{config.max_candidates} lowest") for k in dropped]
            kept = chosen + ([keep_index] if keep_index is not None else [])
            position = {old: new for new, old in enumerate(kept)}
            states, gated_labels = [states[k] for k in kept], [gated_labels[k] for k in kept]
            state_trust = [state_trust[k] for k in kept]
            sparing_trust = [sparing_trust[k] for k in kept]
            state_examples = [state_examples[k] for k in kept]
            candidate_losses = [candidate_losses[k] for k in kept]
            cut = [([position[k] for k in group if k in position], losses)
                   for group, losses in zip(groups, group_losses)]
            groups = [members for members, _ in cut if members]
            group_losses = [losses for members, losses in cut if members]
            keep_index = position[keep_index] if keep_index is not None else None

        # The model each group is gated as: its (first) member, or for replies that are
        # only near-identical, their mean, scored afresh. A non-finite keep loss makes every
        # ratio undefined and leaves the groups as they are for the round.
        group_states = [states[group[0]] for group in groups]
        near_groups: set[int] = set()
        use_mirror_test = config.warm_start and config.mirror_test
        find_specialists = use_mirror_test and config.mirror_specialist_ratio > 0
        find_flipped = use_mirror_test and config.mirror_flipped_ratio > 0
        # The keep model's per-example losses: what near-identical replies and class gains are measured from.
        keep_losses = (per_example_losses(model, keep_state, inputs, targets)
                       if config.near_duplicate_tolerance > 0 or find_specialists or find_flipped else None)
        if config.near_duplicate_tolerance > 0 and len(groups) > 1:
            clusters = near_duplicate_clusters(group_losses, keep_losses, config.near_duplicate_tolerance)
            if len(clusters) < len(groups):
                # A single group keeps its order (the keep candidate leads its own group).
                joined = [groups[cluster[0]] if len(cluster) == 1 else sorted(k for g in cluster for k in groups[g])
                          for cluster in clusters]
                near_groups = {g for g, cluster in enumerate(clusters) if len(cluster) > 1}
                group_states = [group_states[cluster[0]] if len(cluster) == 1
                                else mean_state([states[k] for k in members])
                                for cluster, members in zip(clusters, joined)]
                group_losses = [group_losses[cluster[0]] if len(cluster) == 1
                                else per_example_losses(model, state, inputs, targets)
                                for cluster, state in zip(clusters, group_states)]
                groups = joined
        # What the own-loss start and the mirror test score: each group at its own step, or at
        # its step in an even merge of the client groups (config.warm_start_step).
        scored_losses, scored_reflections = group_losses, None
        share = sum(1 for losses in group_losses if losses is not None)
        merge_step = config.warm_start and config.warm_start_step == "merge" and share > 1
        auto = config.warm_start and config.warm_start_step == "auto" and share > 1
        # The mirror images at each group's own step, computed once: the bend, the class gains,
        # and the mirror test when the round scores at that step all read them.
        reflect = auto or find_specialists or find_flipped
        own_step_reflections = [None if losses is None or not reflect
                                else per_example_losses(model, mirror_state(state, keep_state, model_buffers), inputs,
                                                        targets)
                                for state, losses in zip(group_states, group_losses)]
        bend = None
        if auto:
            measured = [(update_bend(losses, reflected, loss_before), len(group))
                        for group, losses, reflected in zip(groups, group_losses, own_step_reflections)
                        if losses is not None]
            bend = round_bend([value for value, _ in measured], [senders for _, senders in measured],
                              config.warm_start_bend_quantile)
            merge_step = bend is not None and bend >= config.warm_start_bend
        base = None
        if merge_step:
            base = keep_losses if keep_losses is not None else per_example_losses(model, keep_state, inputs, targets)
            # A keep model with a non-finite loss on some example leaves no change to scale.
            merge_step = bool(torch.isfinite(base).all())

        def scored_at(step_share: int) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None] | None]:
            """Each group's per-example losses at keep + delta / step_share (changes times it), and its mirror's."""
            pairs = [None if losses is None else merge_step_losses(model, state, keep_state, base, inputs, targets,
                                                                   step_share, use_mirror_test)
                     for state, losses in zip(group_states, group_losses)]
            return ([None if pair is None else pair[0] for pair in pairs],
                    [None if pair is None else pair[1] for pair in pairs] if use_mirror_test else None)

        if merge_step:
            scored_losses, scored_reflections = scored_at(share)
        def mean_losses(scored: list[torch.Tensor | None]) -> list[float]:
            return [loss_before if losses is None else _mean_loss(losses) for losses in scored]

        def mirror_pairs(scored: list[torch.Tensor | None], reflected_per_group: list) -> list[tuple[float, float]]:
            """(mirror loss, standard error of d) per group; the keep candidate is its own mirror: d = 0 exactly."""
            return [(loss_before, 0.0) if losses is None
                    else mirror_statistics(model, state, keep_state, inputs, targets, own_losses=losses,
                                           reflected_losses=reflected)
                    for state, losses, reflected in zip(group_states, scored, reflected_per_group)]

        reflections = own_step_reflections if use_mirror_test else []

        def score_pairs(scored: list[torch.Tensor | None], reflected_per_group: list | None
                        ) -> tuple[list[float], list[tuple[float, float]]]:
            """The mean losses and mirror pairs that the warm start reads, from one step's scores."""
            return mean_losses(scored), mirror_pairs(scored, reflected_per_group or reflections)

        group_mean_losses, group_mirrors = score_pairs(scored_losses, scored_reflections)
        # (own, mirror image's) best class gain per group; None for the keep candidate.
        class_gains = ([None if losses is None
                        else (best_class_gain(losses, keep_losses, targets),
                              best_class_gain(reflected, keep_losses, targets))
                        for losses, reflected in zip(group_losses, reflections)]
                       if find_specialists or find_flipped else [])
        spared = ([gains is not None and is_specialist(*gains, config.mirror_specialist_ratio) for gains in class_gains]
                  if find_specialists else None)
        flipped = ([gains is not None and is_flipped(*gains, config.mirror_flipped_ratio) for gains in class_gains]
                   if find_flipped else None)

        # Column g of log_alpha is group g.
        heads = [group[0] for group in groups]
        group_of = torch.empty(len(states), dtype=torch.long)
        for g, group in enumerate(groups):
            group_of[group] = g
        gated_keep = int(group_of[keep_index]) if keep_index is not None else None

        stacked = _StackedCandidates(reference, states if len(groups) == len(states) else group_states,
                                     units, model_buffers)
        # Identical models are as trustworthy as the most trusted client that sent them; a
        # mean of near-identical ones only as its least trusted member, since a distrusted
        # client could otherwise borrow an honest one's trust by behaving like it on the gate split.
        def per_group(values: list[float]) -> list[float]:
            return [(min if g in near_groups else max)(values[k] for k in group) for g, group in enumerate(groups)]

        group_trust = per_group(state_trust)
        if trust is not None and config.mirror_trusted > 0:
            trusted = [value >= config.mirror_trusted for value in per_group(sparing_trust)]
            spared = trusted if spared is None else [a or b for a, b in zip(spared, trusted)]
        given_start = initial_log_alpha is not None and tuple(initial_log_alpha.shape) == (len(units), len(states))
        if initial_log_alpha is not None and not given_start:
            # Not an error: a candidate excluded this round changes K, which a caller cannot foresee.
            warnings.warn(f"initial_log_alpha has shape {tuple(initial_log_alpha.shape)}, not (units, gated "
                          f"candidates) = {(len(units), len(states))}; the warm start is used instead", stacklevel=3)

        def warm_start(mean_losses: list[float], mirrors: list[tuple[float, float]]
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The start from these scores (own loss, mirror test, trust bound), and its ceiling."""
            if given_start:
                first = torch.nan_to_num(initial_log_alpha.detach().float()[:, heads], nan=LOG_ALPHA_MIN)
                first = first.clamp(LOG_ALPHA_MIN, -LOG_ALPHA_MIN)
            else:
                first = warm_start_log_alpha(mean_losses, config)
                if use_mirror_test:
                    errors = [error for _, error in mirrors] if config.mirror_confidence > 0 else None
                    first = torch.minimum(first, mirror_log_alpha(mean_losses, [loss for loss, _ in mirrors],
                                                                  config, errors, spared, flipped))
                first = first.expand(len(units), -1)
            cap = first.clone() if config.warm_start_ceiling else None
            if trust is not None and config.trust_strength > 0:
                bounds = torch.tensor([trust_bound(value, config.init_log_alpha, config.trust_strength)
                                       for value in group_trust], dtype=first.dtype)
                first = torch.minimum(first, bounds.clamp(LOG_ALPHA_MIN, -LOG_ALPHA_MIN))
            return first, cap

        start, ceiling = warm_start(group_mean_losses, group_mirrors)
        # A group counts the examples of one of its members (the largest claim): copies add
        # no data. A group holding the keep model (a client that resent it) is the keep
        # model's, which has no count (nan).
        group_counts = (torch.tensor([math.nan if keep_index in group else max(state_examples[k] for k in group)
                                      for group in groups], dtype=torch.float64)
                        if examples is not None else None)
        group_examples = group_counts if config.example_weights else None
        learning_seconds: list[float] = []

        def gates_and_weights(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The deterministic gates of ``alpha`` and the (U, G) mixing weights the merge takes from them."""
            with torch.no_grad():
                gates = deterministic_gates(alpha)
                return gates, _final_weights(alpha, gates, config.mode, gated_keep, group_examples)

        def merged_copy(weights: torch.Tensor) -> dict[str, torch.Tensor]:
            # Own storage: merged tensors are views of one product per unit, and integer
            # buffers are a candidate's own tensors.
            with torch.no_grad():
                return {name: tensor.detach().clone() for name, tensor in stacked.merge(weights).items()}

        def attempt(first: torch.Tensor, cap: torch.Tensor | None
                    ) -> tuple[torch.Tensor, int, int, dict[str, torch.Tensor], float, float]:
            """Learn gates from ``first`` under ``cap``.

            Returns the learned log_alpha, steps, skipped, merge and its loss and accuracy.
            """
            parameter = nn.Parameter(first.clone().contiguous())
            learning_started = time.perf_counter()
            taken, missed = _learn_gates(model, stacked, parameter, inputs, targets, config, gated_keep, cap)
            learning_seconds.append(time.perf_counter() - learning_started)
            built = merged_copy(gates_and_weights(parameter)[1])
            return (parameter.detach(), taken, missed, built) + evaluate_state(model, built, inputs, targets)

        constant_loss = constant_prediction_loss(targets) if config.beat_constant and config.harm_margin else None

        def over_margin(loss: float) -> bool:
            return bool(config.harm_margin) and not loss <= loss_before + config.harm_margin

        def uninformed(loss: float) -> bool:
            return constant_loss is not None and not loss < constant_loss - CONSTANT_BAR_SLACK

        def direction_merge() -> tuple[torch.Tensor, dict[str, torch.Tensor], float, float] | None:
            """The client groups merged with their direction trust as weights (keep model 0).

            Returns the (U, G) weights, the merge, its loss and accuracy; None when no
            client's update has a positive cosine with the server's.
            """
            clients_only = [g for g in range(len(groups)) if g != gated_keep]
            if not clients_only:
                return None
            scores = direction_trust(model, keep_state, [group_states[g] for g in clients_only], (inputs, targets),
                                     config)
            total = float(scores.sum())
            if not total > 0:
                return None
            row = torch.zeros(len(groups), dtype=start.dtype)
            row[clients_only] = (scores / total).to(start.dtype)
            mixing = row.expand(len(units), -1).clone()
            if config.uninformed_merge == "aligned" and group_counts is not None:
                # FedAvg over the aligned clients, each count capped at their median.
                mixing = example_count_weights((mixing > 0).to(mixing.dtype), group_counts, mixing)
            built = merged_copy(mixing)
            return (mixing, built) + evaluate_state(model, built, inputs, targets)

        def starts(first: torch.Tensor, cap: torch.Tensor | None, step: str = ""
                   ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
            """The starts tried in turn until a merge passes the no-harm check."""
            plan = [(KEEP_START if gated_keep is not None else CLIENTS_START, first, cap)]
            if gated_keep is not None:
                if config.keep_mode == "anchor":
                    # First the clients alone: the keep gate starts below the floor and is
                    # capped there, so it is never sampled open and the merge is the clients'
                    # unless every gate of a unit closes. Only if that merge harms does the keep
                    # model join as a candidate (the next start, the "candidate" mode's).
                    alone, alone_cap = first.clone(), None if cap is None else cap.clone()
                    alone[:, gated_keep] = LOG_ALPHA_MIN
                    if alone_cap is not None:
                        alone_cap[:, gated_keep] = LOG_ALPHA_MIN
                    plan.insert(0, (CLIENTS_START, alone, alone_cap))
                # Last, learning again from the keep model's side: every client gate starts at
                # the closed threshold, where a sampled gate is still open 31% of the time, so
                # the gradient can open the candidates that help, starting from a merge that is
                # the keep model. Without a keep candidate there is no such start.
                retry_start = first.clone()
                client_columns = [g for g in range(retry_start.shape[1]) if g != gated_keep]
                retry_start[:, client_columns] = retry_start[:, client_columns].clamp(max=LOG_ALPHA_CLOSED)
                plan.append((CLOSED_START, retry_start, cap))
            return [(name + step, first_, cap_) for name, first_, cap_ in plan]

        def own_step_starts() -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
            """The starts of a round scored at each group's own step, for a merge-step round that harmed."""
            return starts(*warm_start(*score_pairs(group_losses, reflections)), OWN_STEP_SUFFIX)

        plan = starts(start, ceiling)
        # A merge-step round whose starts all harm by more than the margin is learned again
        # from the own step before the closed start, or after its one start without a keep
        # candidate (``SoftMergeConfig.warm_start_step``).
        own_step_retry = merge_step and not given_start
        rejected_loss, rejected_over_margin, harm_fallback, steps, skipped, attempts = None, False, True, 0, 0, 0
        stood_uninformed, direction_weights = False, None
        # The first merge within the margin that only failed to beat the label frequencies,
        # and its start: if no start does better and the keep model does not beat them
        # either, it stands, as without the bar, so a task that no round can yet lift above
        # chance still trains. A keep model that beats them is kept instead.
        within_margin = None
        stepped_back = False
        while plan:
            name, first, cap = plan.pop(0)
            outcome = attempt(first, cap)
            log_alpha, taken, missed, merged, loss_after, accuracy_after = outcome
            steps, skipped, attempts, chosen_start = steps + taken, skipped + missed, attempts + 1, name
            if not over_margin(loss_after) and not uninformed(loss_after):
                harm_fallback = False
                break
            if within_margin is None and not over_margin(loss_after):
                within_margin = (outcome, name)
            if rejected_loss is None:
                rejected_loss, rejected_over_margin = loss_after, over_margin(loss_after)
            if own_step_retry and within_margin is None and (not plan or plan[0][0] == CLOSED_START):
                # Every merge-step start so far harmed: an update scaled by about n reads as
                # an ordinary step at keep + delta / n, and many such updates open together.
                plan, own_step_retry, stepped_back = own_step_starts(), False, True
        else:
            if within_margin is not None and uninformed(loss_before):
                (log_alpha, _, _, merged, loss_after, accuracy_after), chosen_start = within_margin
                harm_fallback, stood_uninformed = False, True
            if config.uninformed_merge != "first" and uninformed(loss_before):
                directed = direction_merge()
                if directed is not None and not over_margin(directed[2]):
                    direction_weights, merged, loss_after, accuracy_after = directed
                    harm_fallback, chosen_start = False, DIRECTION_START
                    stood_uninformed = uninformed(loss_after)
        open_share = None
        if (config.merge_step_share == "open" and merge_step and not given_start and not stepped_back
                and not harm_fallback and not stood_uninformed and direction_weights is None):
            first_weights = gates_and_weights(log_alpha)[1]
            opened = sum(1 for g in range(len(groups)) if g != gated_keep and float(first_weights[:, g].max()) > 0)
            if 0 < opened < share:
                # Each open update moves the merge by delta / opened, not the delta / share it was
                # scored at: its curvature was read at share / opened of its size.
                open_share = opened
                for name, first, cap in starts(*warm_start(*score_pairs(*scored_at(opened))), OPEN_SHARE_SUFFIX):
                    outcome = attempt(first, cap)
                    steps, skipped, attempts = steps + outcome[1], skipped + outcome[2], attempts + 1
                    if not over_margin(outcome[4]) and not uninformed(outcome[4]):
                        log_alpha, _, _, merged, loss_after, accuracy_after = outcome
                        chosen_start = name
                        break
        gates, weights = gates_and_weights(log_alpha)
        blind_units: list[int] = []
        with torch.no_grad():
            if direction_weights is not None:
                weights = direction_weights
                gates = (weights > 0).to(gates.dtype)
            if harm_fallback:
                merged = {name: tensor.detach().clone() for name, tensor in keep_state.items()}
                loss_after, accuracy_after = loss_before, accuracy_before
                weights = torch.zeros_like(weights)
                if gated_keep is not None:
                    weights[:, gated_keep] = 1.0
            elif blind:
                # Nothing the gates learned speaks for a client's value of these. Kept only if the
                # merge then measures the same: a hard router's or a detached parameter has no
                # gradient either, yet the loss the no-harm check passed reads it.
                unjudged = {**merged, **{name: keep_state[name].detach().clone() for name in blind}}
                if evaluate_state(model, unjudged, inputs, targets) == (loss_after, accuracy_after):
                    merged = unjudged
                    floating = [[name for name in unit.tensor_names if reference[name].dtype.is_floating_point]
                                for unit in units]
                    blind_units = [u for u, names in enumerate(floating) if names and set(names) <= set(blind)]
                    if blind_units:
                        # The report describes the model that goes out: these units are the keep model's.
                        weights[blind_units] = 0.0
                        if gated_keep is not None:
                            weights[blind_units, gated_keep] = 1.0
                else:
                    blind = []
            # Back to one column per candidate: a group's members share its gate and weight
            # (a client that resent the global model unchanged shares the keep model's).
            group_sizes = torch.tensor([len(group) for group in groups], dtype=weights.dtype)
            gates, weights = gates[:, group_of], (weights / group_sizes)[:, group_of]
            log_alpha = log_alpha[:, group_of]
    finally:
        model.train(was_training)

    dead_units = [unit_names[u] for u in range(len(units)) if float(gates[u].sum()) <= 0 or u in blind_units]
    report = GateReport(
        units=unit_names,
        candidates=gated_labels,
        gates=gates.tolist(),
        weights=weights.tolist(),
        log_alpha=log_alpha.detach().tolist(),
        candidate_losses=candidate_losses,
        loss_before=loss_before,
        accuracy_before=accuracy_before,
        loss_after=loss_after,
        accuracy_after=accuracy_after,
        excluded=excluded,
        fallback_units=dead_units,
        duplicates=[[gated_labels[k] for k in group] for group in groups if len(group) > 1],
        trust=[group_trust[int(group_of[k])] for k in range(len(states))] if trust is not None else [],
        rejected_loss=rejected_loss,
        rejected_over_margin=rejected_over_margin,
        constant_loss=constant_loss,
        uninformed=stood_uninformed,
        start=chosen_start,
        merge_step=merge_step,
        own_step_retry=stepped_back,
        open_share=open_share,
        bend=bend,
        attempts=attempts,
        harm_fallback=harm_fallback,
        steps=steps,
        skipped_steps=skipped,
        gate_seconds=sum(learning_seconds),
        blind_tensors=blind,
    )
    return merged, report


def _preselect(losses: Sequence[float], count: int) -> list[int]:
    """Indices of the ``count`` lowest losses (ties: the earlier), in their original order."""
    ranked = sorted(range(len(losses)), key=lambda k: (losses[k] if math.isfinite(losses[k]) else math.inf, k))
    return sorted(ranked[:count])


def _final_weights(log_alpha: torch.Tensor, gates: torch.Tensor, mode: str, keep_index: int | None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """The mixing weights the merged model is built from: deterministic gates, no noise.

    With ``counts`` (mode weight), the gates select and the counts weigh
    (:func:`example_count_weights`).
    """
    fallback = _fallback_index(log_alpha, keep_index)
    weights = mixing_weights(gates, mode, fallback, straight_through=False)
    if counts is not None and mode == "weight":
        return example_count_weights(gates, counts, weights)
    if mode == "select":
        # Ties at a clamped gate of 1 go to the larger log_alpha.
        chosen = torch.where(gates.sum(-1) > 0, log_alpha.argmax(-1), fallback)
        weights = nn.functional.one_hot(chosen, log_alpha.shape[1]).to(weights.dtype)
    return weights


def _learn_gates(model: nn.Module, stacked: _StackedCandidates, log_alpha: nn.Parameter, inputs: torch.Tensor,
                 targets: torch.Tensor, config: SoftMergeConfig, keep_index: int | None,
                 ceiling: torch.Tensor | None = None) -> tuple[int, int]:
    """Adam on log_alpha; returns (steps taken, steps skipped for a non-finite loss).

    A step: sample gates, mix, one vector-matrix product per unit (no loop over
    candidates), one forward and backward pass through ``functional_call``, a clipped
    Adam update. Every ``check_every`` steps the deterministic gates are scored on the
    gate split (see :class:`SoftMergeConfig`); learning stops after ``patience`` checks
    without an improvement above ``tolerance``, and ``log_alpha`` ends at the best
    checked value (the start counts as a check). ``ceiling``, if given, caps log_alpha
    throughout (the warm-start ceiling); ``None`` leaves it uncapped.
    """
    if config.steps == 0 or log_alpha.shape[1] < 2 or len(targets) == 0:
        return 0, 0
    generator = torch.Generator().manual_seed(config.seed)
    adam = _FusedAdam(log_alpha, config.lr)
    count = len(targets)
    batch_size = min(config.batch_size, count)
    probe_size = PROBE_BATCHES * config.batch_size
    if count > probe_size:
        probe = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed))[:probe_size]
        probe_inputs, probe_targets = inputs[probe], targets[probe]
    else:
        probe_inputs, probe_targets = inputs, targets
    columns = log_alpha.shape[1]
    keep_rows = (nn.functional.one_hot(_fallback_index(log_alpha, keep_index), columns).to(log_alpha.dtype)
                 if keep_index is not None else None)

    def score() -> float:
        """The objective at the deterministic gates: noise-free, on the probe examples."""
        with torch.no_grad():
            weights = _final_weights(log_alpha, deterministic_gates(log_alpha), config.mode, keep_index)
            logits = functional_call(model, stacked.merge(weights), (probe_inputs,), tie_weights=False)
            value = nn.functional.cross_entropy(logits, probe_targets)
            if config.l0_lambda:
                value = value + config.l0_lambda * expected_l0(log_alpha).mean()
            value = float(value)
        return value if math.isfinite(value) else math.inf

    best_score, best = score(), log_alpha.detach().clone()
    plateau = Plateau(config.tolerance, config.patience, best_score)
    # Adam moves log_alpha by about ``lr`` a step, so the most open gate needs this many
    # steps to be able to close; a plateau before then (the objective often barely moves
    # until a gate crosses over) says nothing about convergence.
    earliest_stop = math.ceil((float(log_alpha.detach().max()) - LOG_ALPHA_CLOSED) / config.lr)
    skipped = 0
    step = 0
    for step in range(1, config.steps + 1):
        batch = torch.randperm(count, generator=generator)[:batch_size]
        gates = sample_gates(log_alpha, generator)
        fallback = keep_rows if keep_rows is not None else nn.functional.one_hot(
            log_alpha.detach().argmax(dim=-1), columns).to(log_alpha.dtype)
        weights = _mix(gates, config.mode, fallback)
        # Every name is given, so tied weights need no untying.
        logits = functional_call(model, stacked.merge(weights), (inputs[batch],), tie_weights=False)
        loss = nn.functional.cross_entropy(logits, targets[batch])
        if config.l0_lambda:
            loss = loss + config.l0_lambda * expected_l0(log_alpha).mean()
        if not bool(torch.isfinite(loss)):
            skipped += 1
        else:
            log_alpha.grad = None
            loss.backward()
            grad = log_alpha.grad
            # An infinite partial still says which way to go; clipping then bounds the step.
            torch.nan_to_num_(grad, nan=0.0, posinf=1e6, neginf=-1e6)
            # As torch.nn.utils.clip_grad_norm_, for the one tensor.
            grad.mul_(torch.clamp(config.max_grad_norm / (torch.linalg.vector_norm(grad) + 1e-6), max=1.0))
            adam.step()
            with torch.no_grad():
                log_alpha.clamp_(LOG_ALPHA_MIN, -LOG_ALPHA_MIN)
                if ceiling is not None:
                    torch.minimum(log_alpha, ceiling, out=log_alpha)
        if step % config.check_every == 0 or step == config.steps:
            current = score()
            if current < best_score:
                best_score, best = current, log_alpha.detach().clone()
            if plateau.reached(current) and step >= earliest_stop:
                break
    with torch.no_grad():
        log_alpha.copy_(best)
    return step, skipped


class _FusedAdam:
    """Adam (torch's fused kernel, through its functional form) on the one log_alpha tensor.

    Why not ``torch.optim.Adam``: log_alpha is a few dozen numbers, so Adam costs per-call
    overhead. The fused kernel halves the update itself (71 against 125 microseconds a
    step), and the functional form skips the ``Optimizer`` wrapper's hooks and profiler
    scopes (about 40 more) and its constructor, whose first call in a process imports
    ``torch._dynamo`` (2–3 s). Same kernel, same arithmetic: the merges are bit-identical
    (docs/performance-notes.md, sessions 25 and 26).
    """

    def __init__(self, parameter: torch.Tensor, lr: float) -> None:
        self.parameter, self.lr = parameter, lr
        self.exp_avg = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        # The kernel counts steps in a float32 tensor, as torch.optim.Adam keeps it.
        self.step_count = torch.tensor(0.0, dtype=torch.float32)

    @torch.no_grad()
    def step(self) -> None:
        adam_update([self.parameter], [self.parameter.grad], [self.exp_avg], [self.exp_avg_sq], [],
                    [self.step_count], foreach=False, capturable=False, differentiable=False, fused=True,
                    has_complex=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0,
                    eps=1e-8, maximize=False)


class Plateau:
    """The early-stop rule: ``patience`` checks in a row without progress.

    Progress is measured from the last check that improved by more than ``tolerance``,
    not from the running best, so a steady improvement of a little less than
    ``tolerance`` per check still counts (min_delta in the sense of Keras'
    EarlyStopping). A tolerance of 0 never stops.
    """

    def __init__(self, tolerance: float, patience: int, start: float) -> None:
        self.tolerance, self.patience = tolerance, patience
        self.anchor, self.stale = start, 0

    def reached(self, score: float) -> bool:
        if score < self.anchor - self.tolerance:
            self.anchor, self.stale = score, 0
        else:
            self.stale += 1
        return self.tolerance > 0 and self.stale >= self.patience


def _fallback_index(log_alpha: torch.Tensor, keep_index: int | None) -> torch.Tensor:
    if keep_index is not None:
        return torch.full((log_alpha.shape[0],), keep_index, dtype=torch.long)
    return log_alpha.argmax(dim=-1)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
