"""Several processes (torch.multiprocessing, gloo, world size 2) give the single-process mechanism.

One pair of forked processes runs every distributed check and saves what each rank saw; the
tests below assert on it against single-process references.
The diffusion loss is made deterministic per example (fixed timestep, noise derived from the
latent) so that 1 and 2 processes can be compared exactly whatever the per-rank generators.
"""

import json
import os
import socket
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig

from peft_dp_saliency import families, selection
from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.diffusion import per_sample_diffusion_loss
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep, broadcast_trainable, poisson_sampler
from peft_dp_saliency.noise import noise_generator
from peft_dp_saliency.sharding import encode_shard, shard_indices
from script_runner import ledger_steps, training_script, tiny_argv
from tiny_models import tiny_encoded_data, tiny_scheduler, tiny_unet

WORLD = 2
N = 13  # odd: the shards have different sizes
INDICES = torch.tensor([0, 2, 3, 5, 8, 9, 12])  # a fixed logical batch
CLIP, Q = 0.05, 0.5
SIGMA, REPEATS = 2.0, 4
SELECTION_SIGMA = 3.0
SAMPLER_N, SAMPLER_Q, SAMPLER_STEPS = 101, 0.3, 300


def fixed_loss(unet, noise_scheduler, latents, states, noise, timesteps, **options):
    """The diffusion loss with per-example randomness that depends on the example only."""
    fixed_noise = torch.sin(13.0 * latents)
    fixed_t = torch.full_like(timesteps, 500)
    return per_sample_diffusion_loss(unet, noise_scheduler, latents, states, fixed_noise, fixed_t, **options)


@contextmanager
def deterministic_loss():
    with mock.patch.object(families.unet, "per_sample_diffusion_loss", fixed_loss):  # SD's loss, both stages
        yield


def lora_unet(init=False, adapter_seed=None):
    unet = tiny_unet().requires_grad_(False)
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=init))
    return unet


def dp_step(unet, sigma, noise_gen=None, data_seed=0):
    settings = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=CLIP, sample_rate=Q, dataset_size=N,
                             micro_batch_size=3)
    return DPSGDStep(unet, tiny_scheduler(), tiny_encoded_data(n=N), settings,
                     noise_gen or noise_generator("cpu"), torch.Generator().manual_seed(data_seed))


def flat_grads(unet) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad])


def my_share(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The part of a logical batch a rank holds (the Poisson sampler's shards: i = rank mod world)."""
    return indices[indices % world == rank]


def clipped_update(sigma, rank=0, world=1) -> torch.Tensor:
    """(sum of clipped grads of INDICES + noise) / (qN), this rank's share of INDICES."""
    unet = lora_unet()
    with deterministic_loss():
        dp_step(unet, sigma)(my_share(INDICES, rank, world))
    return flat_grads(unet)


def selection_average(sigma, rank=0, world=1) -> torch.Tensor:
    """The selection query's (noisy) average clipped gradient over all candidate matrices."""
    unet = tiny_unet().requires_grad_(False)
    config = SimpleNamespace(selection_max_grad_norm=CLIP, selection_noise_multiplier=sigma,
                             selection_seed=0, deterministic_noise=False, selection_clipping="flat",
                             selection_noise_multiplicity=1, selection_sample_rate=1.0)
    with deterministic_loss():
        noisy = selection._noisy_average_gradients(unet, tiny_scheduler(), tiny_encoded_data(n=N),
                                                   find_candidates(unet), config, 4, False)
    return torch.cat([v.flatten() for v in noisy.values()])


def encoding_inputs():
    """(embedded pipeline, first N Fashion-MNIST examples) for the encoding checks."""
    from peft_dp_saliency.data import load_sensitive_dataset
    from peft_dp_saliency.public_model import load_public_pipeline

    return load_public_pipeline(), load_sensitive_dataset(max_examples=N)


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD)}
    os.environ.update(env)
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that may have used it
    GradientState._reset_state()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    found = {}

    # Samplers: one full pass (q = 1) gives each rank its shard; then many Poisson steps.
    shard = next(iter(poisson_sampler(SAMPLER_N, 1.0, 1, noise_generator("cpu")))).tolist()
    batches = list(poisson_sampler(SAMPLER_N, SAMPLER_Q, SAMPLER_STEPS, noise_generator("cpu")))
    counts = torch.zeros(SAMPLER_N)
    for batch in batches:
        counts[batch] += 1
    found["shards"] = gather(shard)
    found["steps_per_rank"] = gather(len(batches))
    found["inclusion_counts"] = gather(counts)
    found["empty_steps_yielded"] = gather(len(list(poisson_sampler(SAMPLER_N, 1e-3, 50, noise_generator("cpu")))))
    found["shard_indices"] = gather(shard_indices(SAMPLER_N, rank, WORLD).tolist())

    # Encoding: each rank encodes its shard only; global indices reach the right rows.
    encoded = encode_shard(families.StableDiffusionFamily(), *encoding_inputs(), batch_size=4, show_progress=False)
    owned = shard_indices(N, rank, WORLD)
    latents, states = encoded.batch(owned)
    found["encoded"] = gather({"size": len(encoded), "rows": len(encoded.latents), "owned": owned,
                               "latents": latents, "states": states})
    try:
        encoded.batch(torch.tensor([(rank + 1) % WORLD]))
        found["foreign_refused"] = gather(False)
    except ValueError:
        found["foreign_refused"] = gather(True)

    # DP-SGD: noise-free update of a fixed batch, then noisy repeats (noise = noisy - noise-free).
    clean = clipped_update(0.0, rank, WORLD)
    noisy = [clipped_update(SIGMA, rank, WORLD) for _ in range(REPEATS)]
    found["dp_sgd_clean"] = gather(clean)
    found["dp_sgd_noise"] = gather(torch.stack([n - clean for n in noisy]))

    # Selection query: every example once, noise once.
    clean_sel = selection_average(0.0, rank, WORLD)
    found["selection_clean"] = gather(clean_sel)
    found["selection_noise"] = gather(selection_average(SELECTION_SIGMA, rank, WORLD) - clean_sel)

    # Replicas: different random LoRA init per rank, broadcast, then real noisy steps (real loss).
    unet = lora_unet(init="gaussian", adapter_seed=100 + rank)
    found["init_differs_before_broadcast"] = gather(torch.cat(
        [p.detach().flatten() for p in unet.parameters() if p.requires_grad]))
    broadcast_trainable(unet)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    step = dp_step(unet, 1.0, data_seed=7 + rank)
    weights = []
    for indices in poisson_sampler(N, Q, 3, noise_generator("cpu")):
        step(indices)
        optimizer.step()
        optimizer.zero_grad()
        weights.append(torch.cat([p.detach().flatten() for p in unet.parameters() if p.requires_grad]))
    found["replica_weights"] = gather(weights)
    if rank == 0:
        torch.save(found, os.path.join(out_dir, "found.pt"))

    # The training script itself, as `accelerate launch --multi_gpu --num_processes 2` runs it on CPU.
    output = os.path.join(out_dir, "run")
    training_script().main(tiny_argv(output, "--seed", 3))
    state = PartialState()
    info = {"rank": state.process_index, "world": state.num_processes, "files": sorted(os.listdir(output))}
    with open(os.path.join(out_dir, f"script-rank{rank}.json"), "w") as file:
        json.dump(info, file)
    if dist.is_initialized():  # accelerator.end_training() already destroys the group
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    # fork: the children reuse the imported modules (a spawn re-imports torch/diffusers: ~15 s each)
    mp.start_processes(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True,
                       start_method="fork")
    return out_dir, torch.load(out_dir / "found.pt", weights_only=False)


pytestmark = pytest.mark.timeout(400)


def test_per_rank_samplers_partition_the_dataset(two_processes):
    found = two_processes[1]
    shards = [set(s) for s in found["shards"]]
    assert set.union(*shards) == set(range(SAMPLER_N))
    assert sum(len(s) for s in shards) == SAMPLER_N  # disjoint
    assert all(len(s) > 0 for s in shards)


def test_sampler_query_and_encoding_share_one_ownership_function(two_processes):
    found = two_processes[1]
    assert found["shards"] == found["shard_indices"]  # the sampler's shard is shard_indices'
    assert [e["owned"].tolist() for e in found["encoded"]] == [shard_indices(N, r, WORLD).tolist() for r in range(WORLD)]


def test_each_rank_encodes_only_its_shard_and_matches_one_process(two_processes):
    found = two_processes[1]
    pipe, dataset = encoding_inputs()
    single = encode_shard(families.StableDiffusionFamily(), pipe, dataset, batch_size=4, show_progress=False)
    reference = families.StableDiffusionFamily().encode_dataset(pipe, dataset, batch_size=4, show_progress=False)
    assert torch.equal(single.latents, reference.latents)  # one process: bit-identical, not a subset
    assert [e["rows"] for e in found["encoded"]] == [7, 6]  # N = 13 over 2 ranks: each holds its shard only
    assert all(e["size"] == N for e in found["encoded"])  # the mechanisms still divide by N
    for e in found["encoded"]:
        expected_latents, expected_states = single.batch(e["owned"])
        torch.testing.assert_close(e["latents"], expected_latents, rtol=1e-4, atol=1e-5)
        assert torch.equal(e["states"], expected_states)
    assert found["foreign_refused"] == [True, True]


def test_poisson_sampling_over_ranks_includes_each_example_with_rate_q(two_processes):
    found = two_processes[1]
    assert found["steps_per_rank"] == [SAMPLER_STEPS] * WORLD
    # Empty local batches are still steps on every rank (Opacus' distributed sampler skips them).
    assert found["empty_steps_yielded"] == [50] * WORLD
    rate = sum(found["inclusion_counts"]) / SAMPLER_STEPS
    # Each example's inclusion ~ Binomial(300, 0.3): std of the rate 0.026; mean over 101 examples.
    assert abs(rate.mean().item() - SAMPLER_Q) < 4 * (SAMPLER_Q * (1 - SAMPLER_Q) / SAMPLER_STEPS / SAMPLER_N) ** 0.5
    assert (rate - SAMPLER_Q).abs().max().item() < 5 * (SAMPLER_Q * (1 - SAMPLER_Q) / SAMPLER_STEPS) ** 0.5


def test_noise_free_update_is_the_same_with_one_and_two_processes(two_processes):
    found = two_processes[1]
    single = clipped_update(0.0)
    assert single.abs().sum() > 0
    for rank_update in found["dp_sgd_clean"]:
        torch.testing.assert_close(rank_update, single, rtol=1e-4, atol=1e-5 * single.abs().max().item())


def test_noise_std_is_sigma_c_over_qn_added_once_over_processes(two_processes):
    """Pooled over ~1.3k coordinates x 4 steps the std estimate is within ~1% (tolerance 6%);
    noise on both ranks would give sqrt(2) x, none would give 0."""
    found = two_processes[1]
    noise = found["dp_sgd_noise"][0]
    torch.testing.assert_close(found["dp_sgd_noise"][1], noise)  # both replicas got the same noise
    expected = SIGMA * CLIP / (Q * N)
    assert noise.numel() > 4000
    assert abs(noise.std().item() / expected - 1) < 0.06
    assert abs(noise.mean().item()) < 4 * expected / noise.numel() ** 0.5
    steps = noise.flatten(1)
    assert abs(torch.corrcoef(steps)[0, 1:].max().item()) < 0.1  # fresh noise every step


def test_selection_query_sums_every_example_once_and_adds_noise_once(two_processes):
    found = two_processes[1]
    single = selection_average(0.0)
    for rank_average in found["selection_clean"]:
        torch.testing.assert_close(rank_average, single, rtol=1e-4, atol=1e-5 * single.abs().max().item())
    assert torch.equal(found["selection_clean"][0], found["selection_clean"][1])
    noise = found["selection_noise"][0]
    torch.testing.assert_close(found["selection_noise"][1], noise)
    expected = SELECTION_SIGMA * CLIP / N
    assert noise.numel() > 4000
    assert abs(noise.std().item() / expected - 1) < 0.06


def test_replicas_hold_identical_weights_after_every_step(two_processes):
    found = two_processes[1]
    before = found["init_differs_before_broadcast"]
    assert not torch.equal(before[0], before[1])  # so the broadcast is what makes them equal
    rank0, rank1 = found["replica_weights"]
    assert len(rank0) == 3
    changed = [not torch.equal(a, b) for a, b in zip(rank0, rank0[1:])]
    assert all(changed)
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)


def test_training_script_runs_in_two_processes_and_only_main_writes(two_processes):
    out_dir = two_processes[0]
    infos = [json.loads((out_dir / f"script-rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(i["rank"], i["world"]) for i in infos] == [(0, WORLD), (1, WORLD)]
    assert "pytorch_lora_weights.safetensors" in infos[0]["files"]
    # Each step recorded once (by the main process), not once per process.
    assert ledger_steps(out_dir / "run") == {"selection": 1, "dp_sgd": 2}
    report = json.loads((out_dir / "run" / "privacy_report.json").read_text())
    assert report["stages"][1]["steps"] == 2 and report["private"] is True
