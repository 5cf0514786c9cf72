"""DP-SAPF's private saliency query: per-matrix noisy gradient norms -> target_modules.

The query (one Gaussian mechanism): per-sample gradients of the diffusion loss over ALL
candidate matrices, clipped jointly to C, summed, divided by N (sensitivity C/N under
add/remove with N public), plus N(0, (sigma_s C / N)^2) on every coordinate. Scores and the
top-ratio choice are post-processing. This module never computes epsilon: the mechanism's
parameters go into the result for the accountant. With the sparse units (entry, row) the same
noisy gradients are post-processed into a mask inside each matrix instead (sparse.py).
"""

from __future__ import annotations

import logging
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .accounting import SELECTION
from .candidates import SPARSE_UNITS, block_label, block_order, group_units, matrix_label
from .config import SaliencyLoraConfig
from .diffusion import EncodedDataset
from .families import StableDiffusionFamily
from .dp_sgd import PoissonSampler
from .noise import noise_generator, sum_and_add_noise_once
from .per_sample import PerSampleClipper, frozen_weights_tracked
from .sharding import rank_and_world, shard_indices
from .sparse import coordinate_scores, decode_masks, encode_masks, random_scores, top_masks, unit_score

logger = logging.getLogger(__name__)


@dataclass
class SelectionResult:
    """What the selection released (all DP outputs or data-independent).

    selected: chosen matrix names in model order; units: unit -> member matrices;
    scores: unit -> noisy score (empty unless strategy 'saliency'; empty for the sparse units, whose
    per-entry scores are not kept); mechanism: the query's parameters for the accountant (None when no
    data was touched); mask: sparse units (entry, row) only, the mask inside each candidate matrix
    (``sparse.encode_masks``: packed bits, trainable_parameters, pool_parameters), a post-processing of
    the query; selected then lists the matrices with at least one masked entry.
    """

    strategy: str
    pool: str
    unit: str
    ratio: float
    score: str
    selected: list[str]
    units: dict[str, list[str]]
    scores: dict[str, float] = field(default_factory=dict)
    mechanism: dict | None = None
    mask: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def masks(self) -> dict[str, torch.Tensor]:
        """Sparse units: selected matrix -> bool mask (d_out, d_in) of its trained entries (CPU)."""
        if self.mask is None:
            raise ValueError(f"a selection of unit {self.unit!r} has no mask (only {SPARSE_UNITS} have one)")
        return decode_masks(self.mask, self.selected)

    def table(self) -> str:
        """Markdown table of selected matrices per block (the paper's Table 7 layout)."""
        blocks: dict[str, list[str]] = {}
        for name in self.units_flat():
            blocks.setdefault(block_label(name), [])
        for name in self.selected:
            label = matrix_label(name)
            if self.mask is not None:  # the fraction of the matrix's entries that is trained
                counts = self.mask["matrices"][name]
                label += f" ({counts['coordinates'] / (counts['shape'][0] * counts['shape'][1]):.0%})"
            blocks[block_label(name)].append(label)
        rows = [f"| {block} | {', '.join(blocks[block]) or '-'} |" for block in sorted(blocks, key=block_order)]
        header = f"| block | selected ({len(self.selected)}/{len(self.units_flat())} matrices, {self.strategy}) |"
        return "\n".join([header, "|---|---|", *rows])

    def units_flat(self) -> list[str]:
        return [name for members in self.units.values() for name in members]


def load_paid_selection(path: str | Path) -> SelectionResult:
    """A saliency query paid for earlier: the select CLI's JSON or a release's selection.json.

    Raises ValueError unless it holds noisy scores and the query's mechanism (so it can be counted).
    """
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(SelectionResult)}
    result = SelectionResult(**{k: v for k, v in data.items() if k in known})
    if result.unit in SPARSE_UNITS:
        raise ValueError(f"{path} is a sparse selection (unit {result.unit!r}): its per-entry noisy scores are "
                         "not stored, so it cannot be re-ranked; rerun the query")
    if result.strategy != "saliency" or result.mechanism is None or not result.scores:
        raise ValueError(f"{path} holds no paid saliency query (strategy {result.strategy!r}, no mechanism or "
                         "scores): pass the output of `python -m peft_dp_saliency.select` or a DP-SAPF release")
    # seeded query noise can be regenerated from the public seed and subtracted from the scores: never reuse it
    if (result.mechanism.get("deterministic_noise") or data.get("config", {}).get("deterministic_noise")
            or "NOT PRIVATE" in str(data.get("privacy", {}).get("noise", ""))):
        raise ValueError(f"{path} was made with deterministic (seeded, NOT PRIVATE) noise: its scores are not DP; "
                         "rerun the query without --deterministic_noise")
    return result


def reselect(paid: SelectionResult, ratio: float) -> SelectionResult:
    """The top-`ratio` units by the same noisy scores: post-processing of the paid query, no new one."""
    k = number_selected(len(paid.units), ratio)
    top = set(sorted(paid.scores, key=paid.scores.get, reverse=True)[:k])
    chosen = [u for u in paid.units if u in top]
    return replace(paid, ratio=ratio, selected=[m for u in chosen for m in paid.units[u]])


def number_selected(num_units: int, ratio: float) -> int:
    """How many units the top-ratio keeps: round(ratio * U), at least 1."""
    return max(1, min(num_units, round(ratio * num_units)))


@torch.no_grad()
def _noisy_average_gradients(unet, noise_scheduler, data: EncodedDataset, candidates, config,
                             batch_size: int, show_progress: bool, family=None) -> dict[str, torch.Tensor]:
    """The Gaussian mechanism: (sum_i clip(grad_i)) / (q N) + N(0, (sigma_s C / (q N))^2) per coordinate,
    the sum over a Poisson subsample of rate q = selection_sample_rate (all examples when q = 1)."""
    family = family or StableDiffusionFamily()
    device = data.latents.device
    n, q = len(data), config.selection_sample_rate
    rank, world = rank_and_world()
    clipper = PerSampleClipper(candidates, config.selection_max_grad_norm, config.selection_clipping)
    k = config.selection_noise_multiplicity
    sums = {f"{name}.weight": torch.zeros(m.weight.shape, dtype=torch.float32, device=device)
            for name, m in candidates.items()}
    # (timestep, noise) of each example is part of the mechanism: drawn from a secret generator
    # (os.urandom), never from the public seed, unless deterministic_noise (tests: NOT private).
    seed = config.selection_seed if config.deterministic_noise else None
    data_generator = noise_generator(device, None if seed is None else seed + 1 + rank)
    if q < 1:  # this rank's share of one Poisson-sampled batch (secret sampling, like DP-SGD's)
        sampler = PoissonSampler(n, q, 1, noise_generator("cpu", None if seed is None else seed + 2000 + rank),
                                 rank, world)
        shard = next(iter(sampler)).to(device)
    else:
        shard = shard_indices(n, rank, world).to(device)  # every example exactly once over processes
    batches = [batch for batch in shard.split(batch_size) if len(batch)]  # an empty sample: noise only
    nonfinite = 0
    for indices in tqdm(batches, desc="saliency query", disable=not show_progress or rank != 0):
        latents, states = data.batch(indices)
        noise, timesteps = family.draw_inputs(len(indices) * k, latents.shape[1:], noise_scheduler,
                                              data_generator, device, latents.dtype)
        with torch.enable_grad(), frozen_weights_tracked(unet, candidates), clipper.capture():
            loss = family.per_sample_loss(unet, noise_scheduler, latents, states, noise, timesteps)
            clipped = clipper.clipped_sums(loss)
        for key, value in clipped.sums.items():
            sums[key] += value
        nonfinite += clipped.nonfinite
    if nonfinite:
        logger.warning("saliency query: %d example(s) had a non-finite gradient and were dropped (factor 0)",
                       nonfinite)
    std = config.selection_noise_multiplier * config.selection_max_grad_norm
    noise_seed = config.selection_seed if config.deterministic_noise else None
    noisy_sums = sum_and_add_noise_once(sums, std, noise_generator(device, noise_seed))
    return {key[: -len(".weight")]: value / (q * n) for key, value in noisy_sums.items()}


def unit_scores(noisy: dict[str, torch.Tensor], units: dict[str, list[str]], score: str,
                noise_std: float) -> dict[str, float]:
    """Score per unit from the noisy average gradients (noise_std = sigma_s C / N per coordinate)."""
    out = {}
    for unit, members in units.items():
        sq = sum(float(noisy[m].pow(2).sum()) for m in members)
        size = sum(noisy[m].numel() for m in members)
        out[unit] = unit_score(sq, size, score, noise_std)
    return out


def select_target_modules(unet, noise_scheduler, data: EncodedDataset | None,
                          config: SaliencyLoraConfig, batch_size: int = 32,
                          show_progress: bool = True, ledger=None, family=None) -> SelectionResult:
    """Choose the adapted matrices and write them into ``config.target_modules``.

    data is needed only for strategy 'saliency'; 'random' and 'all' never touch it.
    Also stores the result (a dict) in ``config.selection_result``. The query's cost: its parameters
    are in ``result.mechanism`` (``accounting.selection_stage``), and with a ``ledger``
    (``accounting.SpendingLedger``) the query is recorded there before it runs, so every call is counted.
    family: the model family (``families.detect_family``); default Stable Diffusion (UNet, DDPM loss).
    """
    family = family or StableDiffusionFamily()
    candidates = family.candidates(unet, config.candidate_pool)
    units = group_units(list(candidates), config.selection_unit)
    k = number_selected(len(units), config.selection_ratio)
    shapes = {name: module.weight.shape for name, module in candidates.items()}
    sparse = config.selection_unit in SPARSE_UNITS
    scores, mechanism, sparse_scores = {}, None, None
    if config.selection_strategy == "all":
        chosen_units = list(units)
        sparse_scores = random_scores(shapes, config.selection_unit, 0) if sparse else None  # every unit is kept
    elif config.selection_strategy == "random":
        seed = config.selection_seed if config.selection_seed is not None else torch.seed()
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen_units = [list(units)[i] for i in sorted(order[:k])]
        sparse_scores = random_scores(shapes, config.selection_unit, seed) if sparse else None
    else:
        if data is None or len(data) == 0:
            raise ValueError("the saliency strategy needs the sensitive dataset (got none or an empty one)")
        if ledger is not None:  # spend first, then run: never refunded
            ledger.record(SELECTION, config.selection_noise_multiplier, config.selection_sample_rate,
                          config.selection_max_grad_norm)
        noisy = _noisy_average_gradients(unet, noise_scheduler, data, candidates, config, batch_size,
                                         show_progress, family)
        noise_std = (config.selection_noise_multiplier * config.selection_max_grad_norm
                     / (config.selection_sample_rate * len(data)))
        if sparse:  # the same noisy gradients, scored per entry / row (post-processing)
            sparse_scores = coordinate_scores(noisy, config.selection_unit, config.saliency_score, noise_std)
        else:
            scores = unit_scores(noisy, units, config.saliency_score, noise_std)
            top = sorted(scores, key=scores.get, reverse=True)[:k]
            chosen_units = [u for u in units if u in set(top)]
        mechanism = {"name": "selection", "noise_multiplier": config.selection_noise_multiplier,
                     "sample_rate": config.selection_sample_rate, "steps": 1, "max_grad_norm": config.selection_max_grad_norm,
                     "dataset_size": len(data), "deterministic_noise": bool(config.deterministic_noise)}
    mask = None
    if sparse:
        # Exactly round(ratio * U) entries / rows of the pool (U from the public model's shapes): how many
        # are trained never depends on the data, only which, and that is post-processing of the query.
        pool_units = sum(shape.numel() if config.selection_unit == "entry" else shape[0] for shape in shapes.values())
        k_sparse = (pool_units if config.selection_strategy == "all"
                    else number_selected(pool_units, config.selection_ratio))
        masks = top_masks(sparse_scores, k_sparse, shapes)
        chosen_units = [u for u in units if masks[u].any()]
        mask = encode_masks(masks, config.selection_unit)
    selected = [m for u in chosen_units for m in units[u]]
    result = SelectionResult(strategy=config.selection_strategy, pool=config.candidate_pool,
                             unit=config.selection_unit, ratio=config.selection_ratio,
                             score=config.saliency_score, selected=selected, units=units,
                             scores=scores, mechanism=mechanism, mask=mask)
    config.target_modules = selected
    config.selection_result = result.to_dict()
    return result
