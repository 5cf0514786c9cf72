"""The only place mechanisms become epsilon: composition, calibration, report, spending ledger.

DP-SAPF releases two kinds of Gaussian mechanisms on the sensitive dataset of size N:

- ``selection``: one Gaussian mechanism on the averaged, jointly clipped gradient of every
  candidate matrix (sensitivity C/N, noise std sigma_s * C/N), i.e. noise multiplier sigma_s,
  sample rate 1, one step;
- ``dp_sgd``: T steps of the Poisson-subsampled Gaussian mechanism with rate q and noise
  multiplier sigma (noise std sigma * C on the clipped sum).

A mechanism is described by a :class:`Stage`; stages compose. Adjacency (``ADJACENCIES``): the
code divides by the fixed, public N and calibrates q = B/N from it, which proves DP for *zero-out*
adjacency (one example replaced by a null example contributing nothing; dp_accounting's
``NeighboringRelation.REPLACE_SPECIAL``), the default; for these Gaussian mechanisms its epsilons
equal add/remove ones. ``replace_one`` (one example replaced by any other: sensitivity 2C) is offered
for policies that need it; only the PLD accountant supports it for Poisson-subsampled stages.
Two accountants are offered: ``"rdp"`` (Opacus' RDP analysis of the sampled Gaussian mechanism,
converted with the Balle et al. 2020 bound) and ``"pld"`` (dp_accounting's privacy loss
distributions, pessimistic estimate: tighter, still an upper bound). Epsilons are in nats.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field

import dp_accounting
import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp

ACCOUNTANTS = ("rdp", "pld")
SELECTION = "selection"
DP_SGD = "dp_sgd"

# The grid of dp_accounting / TF Privacy. Opacus' default grid stops at order 63, which is
# too low for the large noise multipliers that calibration visits at small epsilons.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                   + [128, 256, 512, 1024])

# dp_accounting's default is 1e-4. The PLD is discretised pessimistically, so a coarser grid
# still gives an upper bound on epsilon; at the paper's CIFAR-10 setting 1e-3 is < 0.002 looser
# and 10x faster, which matters because calibration evaluates epsilon ~15 times.
PLD_DISCRETIZATION = 1e-3

# Calibration searches noise multipliers in this range; above it the budget cannot be met.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-6, 1e6

# Both definitions cite Ponomareva et al. 2023, "How to DP-fy ML", Sec. 2.1.1 (the same source in
# the report, the model card and docs/privacy.md).
ADJACENCY_SOURCE = "Ponomareva et al. 2023, How to DP-fy ML, Sec. 2.1.1"
ADJACENCIES = {
    "zero_out": (dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
                 "zero-out: one example replaced by a null example that contributes nothing; the dataset "
                 "size N is fixed and public (dp_accounting NeighboringRelation.REPLACE_SPECIAL; "
                 f"{ADJACENCY_SOURCE})"),
    "replace_one": (dp_accounting.NeighboringRelation.REPLACE_ONE,
                    "replace-one: one example replaced by any other; N fixed and public (dp_accounting "
                    f"NeighboringRelation.REPLACE_ONE; {ADJACENCY_SOURCE})"),
}
DEFAULT_ADJACENCY = "zero_out"
NOISE_URANDOM = "os.urandom-seeded"
NOISE_DETERMINISTIC = "deterministic (NOT PRIVATE: test only)"
INF_JSON = "inf"  # how an infinite epsilon is written to JSON (a string: strict JSON has no inf)


class BudgetCannotBeMetError(ValueError):
    """The target (epsilon, delta) cannot be reached with the requested stages."""


@dataclass(frozen=True)
class Stage:
    """One Gaussian mechanism applied ``steps`` times to the sensitive dataset.

    noise_multiplier: noise std divided by the L2 sensitivity of the summed query (unitless).
    sample_rate: Poisson sampling probability q of each example per step (1 = whole dataset).
    steps: number of applications (0 = the stage did not touch the data).
    max_grad_norm: clipping norm C of the query (recorded; epsilon does not depend on it);
        inf (no clipping) is allowed only with noise_multiplier 0, a non-private stage.
    """

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float

    def __post_init__(self):
        if not self.name:
            raise ValueError("Stage name must be a non-empty string")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        check_sample_rate(self.sample_rate)
        check_steps(self.steps)
        if not (self.max_grad_norm > 0 and (math.isfinite(self.max_grad_norm)
                                            or self.noise_multiplier == 0)):
            raise ValueError(f"max_grad_norm must be finite and > 0 (inf only for a stage without "
                             f"noise, i.e. non-private), got {self.max_grad_norm}")

    def to_dict(self) -> dict:
        """JSON-ready (an infinite max_grad_norm, i.e. no clipping, is written as "inf")."""
        data = asdict(self)
        data["max_grad_norm"] = _float_to_json(self.max_grad_norm)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Stage":
        return cls(name=data["name"], noise_multiplier=float(data["noise_multiplier"]),
                   sample_rate=float(data["sample_rate"]), steps=int(data["steps"]),
                   max_grad_norm=float(data["max_grad_norm"]))


def selection_stage(noise_multiplier: float, max_grad_norm: float, sample_rate: float = 1.0) -> Stage:
    """The one-shot selection query: a Gaussian mechanism on the whole dataset, or on a Poisson
    subsample of rate ``sample_rate`` (amplified by subsampling)."""
    return Stage(SELECTION, noise_multiplier, sample_rate=sample_rate, steps=1, max_grad_norm=max_grad_norm)


def dp_sgd_stage(noise_multiplier: float, sample_rate: float, steps: int,
                 max_grad_norm: float) -> Stage:
    """``steps`` DP-SGD steps with Poisson rate ``sample_rate``."""
    return Stage(DP_SGD, noise_multiplier, sample_rate, steps, max_grad_norm)


# ---------------------------------------------------------------------------------------------
# Validation


def default_delta(n: int) -> float:
    """The recommended delta 1 / (n ln n) for n >= 2 examples, at most 1 / (2 n) (so < 1/n for small n)."""
    if n < 2:
        raise ValueError(f"dataset size must be >= 2 to derive a default delta, got {n}")
    return 1.0 / (n * max(math.log(n), 2.0))


def check_delta(delta: float, dataset_size: int | None = None) -> None:
    """Raise ValueError unless 0 < delta < 1 (and delta < 1/N when N is given)."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if dataset_size is not None and delta >= 1.0 / dataset_size:
        raise ValueError(
            f"delta={delta:g} >= 1/N = {1.0 / dataset_size:g} for N={dataset_size}: such a "
            f"guarantee allows releasing an example in the clear. Use delta < 1/N; the "
            f"recommended default is 1/(N ln N) = {default_delta(dataset_size):.3g}.")


def check_sample_rate(sample_rate: float) -> None:
    """Raise ValueError unless 0 < sample_rate <= 1."""
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def check_steps(steps: int) -> None:
    """Raise ValueError unless steps is an integer >= 0."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def check_adjacency(adjacency: str) -> None:
    """Raise ValueError unless ``adjacency`` is a key of ADJACENCIES."""
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {sorted(ADJACENCIES)}, got {adjacency!r}")


def supports(accountant: str, stages, adjacency: str) -> bool:
    """Whether ``accountant`` can account ``stages`` under ``adjacency``.

    Opacus' RDP analysis of the sampled Gaussian holds for zero-out (= add/remove here); under
    replace-one it covers only unsampled stages (sensitivity 2C, i.e. noise multiplier / 2).
    """
    _check_accountant(accountant)
    check_adjacency(adjacency)
    return accountant == "pld" or adjacency == "zero_out" or all(s.sample_rate == 1 for s in _active(stages))


# ---------------------------------------------------------------------------------------------
# Epsilon


def _active(stages) -> list[Stage]:
    """Stages that touched the data (steps > 0)."""
    return [stage for stage in stages if stage.steps > 0]


def stage_rdp(stage: Stage, adjacency: str = DEFAULT_ADJACENCY) -> np.ndarray:
    """RDP of one stage at every order of RDP_ORDERS (nats; inf if noise_multiplier is 0).

    Under replace-one only unsampled stages are supported (see :func:`supports`).
    """
    sigma = stage.noise_multiplier
    if adjacency == "replace_one":
        if stage.sample_rate != 1:
            raise ValueError("the RDP accountant does not support replace_one adjacency with Poisson "
                             "sampling; use accountant 'pld' (dp_accounting's REPLACE_ONE)")
        sigma = sigma / 2  # sensitivity 2C under replacement
    return opacus_rdp.compute_rdp(q=stage.sample_rate, noise_multiplier=sigma,
                                  steps=stage.steps, orders=list(RDP_ORDERS))


def _rdp_epsilon_and_order(total_rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, optimal order) from a composed RDP curve on RDP_ORDERS."""
    with warnings.catch_warnings():
        # Opacus warns when the optimum sits at an end of the grid; the bound at any order is
        # valid (only possibly loose), and calibration probes such extremes on purpose.
        warnings.simplefilter("ignore")
        epsilon, order = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total_rdp,
                                                      delta=delta)
    return max(0.0, float(epsilon)), float(order)


def _stage_event(stage: Stage) -> dp_accounting.DpEvent:
    """The dp_accounting event of a stage: a (Poisson-subsampled) Gaussian, self-composed."""
    event = dp_accounting.GaussianDpEvent(stage.noise_multiplier)
    if stage.sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(stage.sample_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, stage.steps)


def _pld_epsilon(stages: list[Stage], delta: float, adjacency: str) -> float:
    """Epsilon (nats) of the composed stages from dp_accounting's PLD accountant."""
    accountant = dp_accounting.pld.PLDAccountant(
        ADJACENCIES[adjacency][0], value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(dp_accounting.ComposedDpEvent([_stage_event(s) for s in stages]))
    return max(0.0, float(accountant.get_epsilon(delta)))


def compute_epsilon(stages, delta: float, accountant: str = "rdp",
                    dataset_size: int | None = None, adjacency: str = DEFAULT_ADJACENCY) -> float:
    """Epsilon (nats) of the composition of ``stages`` at ``delta`` under ``adjacency``.

    Stages with steps == 0 contribute nothing; a stage with noise_multiplier 0 and steps > 0
    makes epsilon infinite. ``dataset_size`` (optional) enables the check delta < 1/N.
    Raises ValueError if the accountant does not support the adjacency (:func:`supports`).
    """
    check_delta(delta, dataset_size)
    if not supports(accountant, stages, adjacency):
        raise ValueError(f"accountant {accountant!r} does not support {adjacency} adjacency for Poisson-"
                         "subsampled stages; use accountant 'pld'")
    active = _active(stages)
    if not active:
        return 0.0
    if any(stage.noise_multiplier == 0 for stage in active):
        return math.inf
    if accountant == "pld":
        return _pld_epsilon(active, delta, adjacency)
    return _rdp_epsilon_and_order(sum(stage_rdp(s, adjacency) for s in active), delta)[0]


def budget_shares(stages, delta: float, accountant: str = "rdp",
                  adjacency: str = DEFAULT_ADJACENCY) -> dict[str, float]:
    """Each stage name's fraction of the budget, by ``accountant``.

    rdp: share(name) = sum over stages called ``name`` of rdp_stage(a*) / rdp_total(a*), where a*
    is the RDP order that minimises the composed epsilon at ``delta`` (the paper's Eq. in §3.4,
    Table 10). pld: epsilon has no additive split, so share(name) = epsilon of that name's stages
    alone / sum over names of the same (each at ``delta``). Shares sum to 1 unless nothing was
    spent (all 0). If some stages are non-private, those share the budget equally, the others get 0.
    """
    check_delta(delta)
    if accountant == "pld":
        return _pld_shares(stages, delta, adjacency)
    shares = {stage.name: 0.0 for stage in stages}
    active = _active(stages)
    non_private = [stage for stage in active if stage.noise_multiplier == 0]
    if non_private:
        for stage in non_private:
            shares[stage.name] += 1.0 / len(non_private)
        return shares
    if not active:
        return shares
    curves = [stage_rdp(stage, adjacency) for stage in active]
    _, order = _rdp_epsilon_and_order(sum(curves), delta)
    index = RDP_ORDERS.index(order)
    total = sum(curve[index] for curve in curves)
    for stage, curve in zip(active, curves):
        shares[stage.name] += float(curve[index] / total)
    return shares


def _pld_shares(stages, delta: float, adjacency: str) -> dict[str, float]:
    names = list(dict.fromkeys(stage.name for stage in stages))
    alone = {name: compute_epsilon([s for s in stages if s.name == name], delta, "pld", adjacency=adjacency)
             for name in names}
    infinite = [name for name in names if alone[name] == math.inf]
    if infinite:
        return {name: (1.0 / len(infinite) if name in infinite else 0.0) for name in names}
    total = sum(alone.values())
    return {name: (alone[name] / total if total > 0 else 0.0) for name in names}


# ---------------------------------------------------------------------------------------------
# Calibration


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, fixed_stages=(), accountant: str = "rdp",
                               tolerance: float = 0.01, dataset_size: int | None = None,
                               adjacency: str = DEFAULT_ADJACENCY) -> float:
    """Smallest DP-SGD noise multiplier such that fixed_stages + DP-SGD meet ``target_epsilon``.

    The returned sigma always satisfies compute_epsilon(fixed_stages + [dp_sgd(sigma)]) <=
    target_epsilon (it is the upper end of a verified search bracket, i.e. rounded toward more
    noise), and the epsilon it spends is within ``tolerance`` (nats) of the target unless the
    bracket reached a relative width of 1e-6 first. target_epsilon = inf (non-private)
    returns 0.0; so does steps == 0 once the fixed stages fit.

    Raises BudgetCannotBeMetError if target_epsilon is not > 0, or if the fixed stages alone
    (e.g. a selection query with a small noise multiplier) already spend the target.
    """
    _check_accountant(accountant)
    check_delta(delta, dataset_size)
    check_sample_rate(sample_rate)
    check_steps(steps)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if not supports(accountant, [dp_sgd_stage(1.0, sample_rate, 1, 1.0)], adjacency):
        raise ValueError(f"accountant {accountant!r} cannot calibrate Poisson-subsampled DP-SGD under "
                         f"{adjacency} adjacency; use accountant 'pld'")
    if target_epsilon == math.inf:
        return 0.0
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise BudgetCannotBeMetError(
            f"target_epsilon must be a finite number > 0 (or inf for a non-private run), "
            f"got {target_epsilon}")
    fixed = list(fixed_stages)
    fixed_epsilon = compute_epsilon(fixed, delta, accountant, adjacency=adjacency)
    if fixed_epsilon >= target_epsilon:
        raise BudgetCannotBeMetError(_fixed_stages_message(fixed, fixed_epsilon, target_epsilon,
                                                           delta, accountant))
    if steps == 0:
        return 0.0

    def epsilon_at(sigma: float) -> float:
        # max_grad_norm does not enter epsilon (noise scales with C); 1.0 is a placeholder.
        return compute_epsilon(fixed + [dp_sgd_stage(sigma, sample_rate, steps, 1.0)],
                               delta, accountant, adjacency=adjacency)

    try:
        bracket = _bracket(epsilon_at, target_epsilon)
    except BudgetCannotBeMetError as error:
        raise BudgetCannotBeMetError(_fixed_stages_message(
            fixed, fixed_epsilon, target_epsilon, delta, accountant) + f" ({error})") from None
    return _refine(epsilon_at, target_epsilon, tolerance, *bracket)


def selection_noise_for_budget(epsilon: float, delta: float, adjacency: str = DEFAULT_ADJACENCY,
                               dataset_size: int | None = None, sample_rate: float = 1.0) -> float:
    """The smallest selection noise multiplier sigma_s whose query (Poisson rate ``sample_rate``) alone
    costs at most ``epsilon`` (nats, at ``delta``) under every accountant that supports ``adjacency``:
    the larger of the per-accountant calibrations."""
    probe = [selection_stage(1.0, 1.0, sample_rate)]
    return max(calibrate_noise_multiplier(epsilon, delta, sample_rate, 1, accountant=name,
                                          dataset_size=dataset_size, adjacency=adjacency)
               for name in ACCOUNTANTS if supports(name, probe, adjacency))


def _bracket(epsilon_at, target: float) -> tuple[float, float, float, float]:
    """(low, eps(low), high, eps(high)) with eps(low) > target >= eps(high) and low < high.

    Doubles (or halves) sigma from 1. Halving stops at MIN_NOISE_MULTIPLIER, which then meets
    the target (low = 0, eps = inf).
    """
    high, high_epsilon = 1.0, epsilon_at(1.0)
    if high_epsilon <= target:
        while high > MIN_NOISE_MULTIPLIER:
            low, low_epsilon = 0.5 * high, epsilon_at(0.5 * high)
            if low_epsilon > target:
                return low, low_epsilon, high, high_epsilon
            high, high_epsilon = low, low_epsilon
        return 0.0, math.inf, high, high_epsilon
    while high_epsilon > target:
        low, low_epsilon = high, high_epsilon
        high = 2.0 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetCannotBeMetError(
                f"DP-SGD would need a noise multiplier above {MAX_NOISE_MULTIPLIER:g}")
        high_epsilon = epsilon_at(high)
    return low, low_epsilon, high, high_epsilon


def _refine(epsilon_at, target: float, tolerance: float, low: float, low_epsilon: float,
            high: float, high_epsilon: float) -> float:
    """Shrink the bracket until eps(high) is in [target - tolerance, target]; return high.

    Bisection whose trial point is interpolated linearly in (log sigma, log epsilon), where
    the Gaussian-mechanism curves are nearly straight, aiming at the middle of the window; the
    trial is kept inside the inner 90% of the bracket so the bracket always shrinks. Only
    verified points become ``high``, so the result never exceeds the target.
    """
    aim = target - 0.5 * tolerance
    while high_epsilon < target - tolerance and high - low > 1e-6 * high:
        fraction = 0.5
        if low > 0 and math.isfinite(low_epsilon) and high_epsilon > 0 and aim > 0:
            fraction = math.log(low_epsilon / aim) / math.log(low_epsilon / high_epsilon)
            fraction = min(0.95, max(0.05, fraction))
        middle = math.exp((1 - fraction) * math.log(low) + fraction * math.log(high)) \
            if low > 0 else fraction * high
        middle_epsilon = epsilon_at(middle)
        if middle_epsilon <= target:
            high, high_epsilon = middle, middle_epsilon
        else:
            low, low_epsilon = middle, middle_epsilon
    return high


def _fixed_stages_message(fixed: list[Stage], fixed_epsilon: float, target_epsilon: float,
                          delta: float, accountant: str) -> str:
    described = ", ".join(f"{s.name}(sigma={s.noise_multiplier:g}, q={s.sample_rate:g}, "
                          f"steps={s.steps})" for s in fixed) or "none"
    return (f"Privacy budget cannot be met: target epsilon={target_epsilon:g} at delta="
            f"{delta:.3g}, but the fixed stages [{described}] alone spend epsilon="
            f"{fixed_epsilon:.4g} ({accountant}). Use a larger target_epsilon, a larger "
            f"--selection_noise_multiplier, fewer steps, or a smaller batch.")


# ---------------------------------------------------------------------------------------------
# JSON helpers


def _float_to_json(value: float):
    """inf -> "inf" (strict JSON has no infinity); finite floats unchanged; NaN is an error."""
    if math.isnan(value):
        raise ValueError("NaN cannot be serialised as a privacy quantity")
    return INF_JSON if value == math.inf else value


def _float_from_json(value) -> float:
    return math.inf if value == INF_JSON else float(value)


def write_json_atomic(path: str, payload) -> None:
    """Write strict JSON to ``path`` via a temporary file in the same directory + os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".",
                                        suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(payload, file, indent=2, allow_nan=False)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
        fsync_directory(directory)  # the rename itself survives a power loss
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def fsync_directory(directory: str) -> None:
    """Flush a directory entry (after os.replace) to disk; a no-op where directories cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# ---------------------------------------------------------------------------------------------
# Report


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the guarantee and its implementation rely on."""
    versions = {}
    for key, distribution in [("opacus", "opacus"), ("dp_accounting", "dp-accounting"),
                              ("torch", "torch"), ("peft", "peft"), ("diffusers", "diffusers")]:
        try:
            versions[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = "not installed"
    return versions


@dataclass
class PrivacyReport:
    """The (epsilon, delta) guarantee of one run, as released next to the adapter.

    epsilon: {"rdp": nats, "pld": nats} (only the accountants that support the adjacency); an
    infinite value is written to JSON as the string "inf" (as is an infinite target_epsilon) and
    read back as float("inf").
    private: False if any epsilon is infinite or the noise was deterministic.
    adjacency: the key of ADJACENCIES; adjacency_definition: its words and source.
    budget_shares: each stage's share by ``budget_shares_accountant`` (the calibration accountant).
    class_names: where the released class names came from (they are public input, not DP outputs).
    """

    dataset_size: int
    delta: float
    epsilon: dict[str, float]
    stages: list[dict]
    target_epsilon: float
    accountant: str
    budget_shares: dict[str, float]
    private: bool
    noise_source: str = NOISE_URANDOM
    adjacency: str = DEFAULT_ADJACENCY
    adjacency_definition: str = ADJACENCIES[DEFAULT_ADJACENCY][1]
    budget_shares_accountant: str = "rdp"
    class_names: str = "public"
    library_versions: dict[str, str] = field(default_factory=library_versions)
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, stages, dataset_size: int, delta: float, target_epsilon: float,
              accountant: str, deterministic_noise: bool = False, adjacency: str = DEFAULT_ADJACENCY,
              class_names: str = "public", extra: dict | None = None) -> "PrivacyReport":
        """Account ``stages`` under every accountant that supports ``adjacency``; ``accountant`` is
        the one calibrated with (its epsilon is the guarantee, and it splits the budget)."""
        stages = list(stages)
        if not supports(accountant, stages, adjacency):
            raise ValueError(f"accountant {accountant!r} does not support {adjacency} adjacency here")
        epsilon = {name: compute_epsilon(stages, delta, name, dataset_size, adjacency)
                   for name in ACCOUNTANTS if supports(name, stages, adjacency)}
        private = not deterministic_noise and all(math.isfinite(e) for e in epsilon.values())
        return cls(dataset_size=dataset_size, delta=delta, epsilon=epsilon,
                   stages=[stage.to_dict() for stage in stages], target_epsilon=target_epsilon,
                   accountant=accountant, budget_shares=budget_shares(stages, delta, accountant, adjacency),
                   private=private,
                   noise_source=NOISE_DETERMINISTIC if deterministic_noise else NOISE_URANDOM,
                   adjacency=adjacency, adjacency_definition=ADJACENCIES[adjacency][1],
                   budget_shares_accountant=accountant, class_names=class_names,
                   extra=dict(extra or {}))

    @property
    def guarantee_epsilon(self) -> float:
        """The epsilon of the calibration accountant: the one the run's guarantee states."""
        return self.epsilon[self.accountant]

    def to_dict(self) -> dict:
        """JSON-ready dict (infinities as "inf")."""
        data = asdict(self)
        data["epsilon"] = {k: _float_to_json(v) for k, v in self.epsilon.items()}
        data["target_epsilon"] = _float_to_json(self.target_epsilon)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyReport":
        data = dict(data)
        data["epsilon"] = {k: _float_from_json(v) for k, v in data["epsilon"].items()}
        data["target_epsilon"] = _float_from_json(data["target_epsilon"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyReport":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        """Write the report to ``path`` atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "PrivacyReport":
        with open(path, encoding="utf-8") as file:
            return cls.from_dict(json.load(file))

    def stage_objects(self) -> list[Stage]:
        """The accounted stages as :class:`Stage` objects."""
        return [Stage.from_dict(stage) for stage in self.stages]


# ---------------------------------------------------------------------------------------------
# Ledger


class SpendingLedger:
    """Crash-safe record of the privacy spent so far, backed by a small JSON file.

    Call :meth:`record` BEFORE a mechanism touches the data; each call rewrites the file
    atomically, so a step that ran before a crash is never refunded. Reopening the same path
    continues the record. Consecutive records with equal (name, sigma, q, C) merge into one
    :class:`Stage` by adding steps, so the file stays tiny.
    """

    def __init__(self, path: str):
        self.path = path
        self._stages: list[Stage] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                self._stages = [Stage.from_dict(s) for s in json.load(file)["stages"]]

    def record(self, stage_name: str, noise_multiplier: float, sample_rate: float,
               max_grad_norm: float, steps: int = 1) -> None:
        """Persist ``steps`` applications of a mechanism (call before running them)."""
        new = Stage(stage_name, float(noise_multiplier), float(sample_rate), int(steps),
                    float(max_grad_norm))
        last = self._stages[-1] if self._stages else None
        if last is not None and (last.name, last.noise_multiplier, last.sample_rate,
                                 last.max_grad_norm) == (new.name, new.noise_multiplier,
                                                         new.sample_rate, new.max_grad_norm):
            self._stages[-1] = Stage(last.name, last.noise_multiplier, last.sample_rate,
                                     last.steps + new.steps, last.max_grad_norm)
        else:
            self._stages.append(new)
        write_json_atomic(self.path, {"stages": [stage.to_dict() for stage in self._stages]})

    def stages(self) -> list[Stage]:
        """All recorded stages, oldest first."""
        return list(self._stages)

    def steps_of(self, stage_name: str) -> int:
        """How many applications of the mechanism `stage_name` are recorded (e.g. DP-SGD steps)."""
        return sum(stage.steps for stage in self._stages if stage.name == stage_name)
