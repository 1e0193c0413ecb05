"""`lfm-fast train --preset NAME --dry-run`: an experiment's size and cost before any data exists.

The preset's model and data pipeline are built on random latents of its shape (with its conditions, flips and
posterior std, in shards as `prepare` writes them), and training steps run through the pieces the training loop
uses (FSDP2 on a world of one, the preset's precision and activation checkpointing, the step's flow and
augmentation draws, AdamW). Reported: parameters, forward GFLOP per image (2 FLOPs per multiply-add), the
activation memory of one image (the bytes autograd saves in the forward, measured, with SDPA attention: flash
attention saves the same O and log-sum-exp on a GPU), the memory per GPU at the preset's batch over 1–64 GPUs
(FSDP2 full sharding of fp32 weights, gradients, Adam moments and the EMA: 20 bytes a parameter), and the time of
one step on this machine at a reduced batch, scaled to the preset's per-GPU batch (in fp32 on a CPU without bf16
units, where torch emulates bf16 GEMMs).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time

import torch

from lfm_fast.config import ExperimentConfig
from lfm_fast.train.throughput import GPU_PEAK_BF16, forward_flops_per_image

GPU_COUNTS = (1, 8, 16, 32, 64)
STATE_BYTES_PER_PARAM = 20  # fp32 weights 4 + gradients 4 + Adam moments 8 + EMA 4
H100_MFU = 0.40


def random_latents(folder: str, cfg: ExperimentConfig, n: int) -> None:
    """n random samples in the preset's latent shape with what its training reads: labels, mirror-image latents,
    a posterior std, and its condition (semantic maps at image size, or 2 inpainting masks per sample)."""
    from lfm_fast.data.latents import LatentShardWriter

    c, s, m = cfg.model.in_channels, cfg.model.input_size, cfg.model
    g = torch.Generator().manual_seed(0)
    lat = torch.randn((n, c, s, s), generator=g)
    std = torch.full_like(lat, 0.05).half()
    extra = {"latents_flip": lat.flip(-1), "latents_std": std, "latents_flip_std": std}
    meta = {"latent_shape": [c, s, s], "num_classes": max(0, m.num_classes), "autoencoder": "", "scaling_factor": 1.0,
            "image_size": s << max(m.cond_stages, 3), "conditions": []}
    if m.condition == "semantic":
        size = s << m.cond_stages
        extra["semantic"] = torch.randint(0, m.semantic_classes, (n, size, size), generator=g).to(torch.uint8)
        meta.update(conditions=["semantic"], semantic_classes=m.semantic_classes, image_size=size)
    if m.condition == "inpaint":
        masked = lat[:, None].repeat(1, 2, 1, 1, 1)
        extra.update(masked_latents=masked, masked_latents_flip=masked.flip(-1),
                     masks=(torch.rand((n, 2, s, s), generator=g) < 0.4).to(torch.uint8))
        meta.update(conditions=["inpaint"], inpaint_masks=2, mask_levels=1)
    writer = LatentShardWriter(folder, shard_size=n)
    writer.add(lat, torch.arange(n) % max(1, m.num_classes), **extra)
    writer.close(meta)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs (the activations of a training step): each
    saved view counted once, the weights themselves (leaves that require grad) not at all."""
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen and not (t.is_leaf and t.requires_grad):
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): elsewhere torch emulates bf16 GEMMs, 10–100×
    slower than fp32, and a bf16 step's time says nothing about the model."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _measure(cfg: ExperimentConfig, depth: int, batch: int, steps: int, time_precision: str) -> tuple[float, float, int]:
    """(bytes autograd saves per image in the preset's precision, seconds per training step in `time_precision`,
    parameters) of the preset's net cut to `depth` blocks, through the training loop's pieces."""
    from lfm_fast.data.latents import LatentShardDataset
    from lfm_fast.dist import init_distributed
    from lfm_fast.flow import draw_flow, flow_matching_loss
    from lfm_fast.train.step import EpochSampler, configure_model_for_data, draw_augmentation, make_optimizer, step_generator
    from lfm_fast.models.dit import DiT
    from lfm_fast.train.parallelize import apply_ac, build_parallel_dit

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=depth, attn_backend="sdpa"))
    tc, d = cfg.train, init_distributed("cpu")
    with tempfile.TemporaryDirectory() as folder:
        random_latents(folder, cfg, max(4, 2 * batch))  # (fewer than the preset's batch: the epoch wraps)
        ds = LatentShardDataset(folder)
        configure_model_for_data(cfg, ds)
        sampler, condition = EpochSampler(len(ds), tc.seed), cfg.model.condition

        def loss(model, k: int, n: int = batch):
            idx = sampler.indices(k * n, n)
            draws = draw_flow(n, ds.latent_shape, cfg.flow, step_generator(tc.seed, 0, k), tc.label_dropout,
                              tc.cond_dropout if condition != "none" else 0.0)
            flips, eps = draw_augmentation(n, ds.latent_shape, cfg.data, step_generator(tc.seed, 3, k))
            x0, y = ds.get_batch(idx, flips, eps)
            cond = None if condition == "none" else ds.get_condition(idx, condition, None, flips)
            return flow_matching_loss(model, x0, y if cfg.model.num_classes else None, cfg.flow,
                                      label_dropout=tc.label_dropout, cond=cond, draws=draws, cond_dropout=tc.cond_dropout)

        def build(precision):
            return build_parallel_dit(cfg.model, d.mesh, d.device, precision, tc.activation_checkpointing, False, tc.seed)

        # activations: the forward only (its graph is dropped), at batch 2 less batch 1, so what one more image adds;
        # on the plain module under autocast (FSDP2's bf16 compute), whose weights and their bf16 casts stay put
        plain = DiT(cfg.model)
        plain.initialize_weights(tc.seed)
        apply_ac(plain, tc.activation_checkpointing)
        params = sum(p.numel() for p in plain.parameters())
        with torch.autocast("cpu", torch.bfloat16, enabled=tc.precision == "bf16"):
            saved = saved_bytes(lambda: loss(plain, 0, 2)) - saved_bytes(lambda: loss(plain, 0, 1))
        if not steps:
            return saved, 0.0, params
        model = build(time_precision)
        optimizer = make_optimizer(model, tc)
        times = []
        for k in range(1 + steps):  # one warm-up step, then the timed ones: the fastest counts (this machine is noisy)
            t0 = time.perf_counter()
            loss(model, k).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return saved, min(times[1:]), params


def dry_run(cfg: ExperimentConfig, batch: int = 2, steps: int = 3) -> dict:
    """The preset's figures (see the module doc). Its blocks are identical, so the net is measured cut to 1 and 2
    blocks and extrapolated linearly in depth: activations, step time and parameters (checked against the whole
    net's count, built on the meta device). With activation checkpointing, the recomputed block's activations
    (one block's, without checkpointing) are added to what the forward keeps."""
    from lfm_fast.models.dit import DiT

    tc, depth = cfg.train, cfg.model.depth
    time_precision = tc.precision if tc.precision == "fp32" or cpu_has_bf16() else "fp32"
    (a1, t1, p1), (a2, t2, p2) = (_measure(cfg, k, batch, steps, time_precision) for k in (1, 2))
    activation = a1 + (a2 - a1) * (depth - 1)
    if tc.activation_checkpointing != "none":
        plain = dataclasses.replace(cfg, train=dataclasses.replace(tc, activation_checkpointing="none"))
        (b1, _, _), (b2, _, _) = (_measure(plain, k, 1, 0, time_precision) for k in (1, 2))
        activation += b2 - b1
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(dataclasses.replace(cfg.model, cond_channels=_cond_channels(cfg))).parameters())
    assert params == p1 + (p2 - p1) * (depth - 1), "the blocks are not identical"
    # a block's time is what the second block adds; where noise hides it (a busy machine can time 2 blocks faster
    # than 1), half the 2-block step stands in for it, so the extrapolation never goes below one block's worth
    seconds = t1 + (t2 - t1 if t2 > t1 else t2 / 2) * (depth - 1)
    fwd = forward_flops_per_image(dataclasses.replace(cfg.model, cond_channels=_cond_channels(cfg)))
    memory = {}
    for gpus in GPU_COUNTS:
        micro = math.ceil(tc.batch_size / gpus / tc.grad_accum)
        memory[gpus] = {"micro_batch": micro, "activations_gib": micro * activation / 2**30,
                        "states_gib": STATE_BYTES_PER_PARAM * params / gpus / 2**30}
        memory[gpus]["total_gib"] = memory[gpus]["activations_gib"] + memory[gpus]["states_gib"]
    train_flops = 3 * fwd * tc.batch_size * tc.steps
    return {"preset": cfg.name, "params": params, "forward_gflops_per_image": fwd / 1e9,
            "activation_mib_per_image": activation / 2**20, "memory_per_gpu": memory, "batch": tc.batch_size,
            "steps": tc.steps, "measured_batch": batch, "step_seconds_here": seconds, "step_precision": time_precision,
            "step_seconds_here_at_preset_batch": seconds * tc.batch_size / batch, "train_pflops": train_flops / 1e15,
            "h100_hours_at_40pct_mfu": train_flops / (H100_MFU * GPU_PEAK_BF16["H100"]) / 3600,
            "precision": tc.precision, "activation_checkpointing": tc.activation_checkpointing, "threads": torch.get_num_threads()}


def _cond_channels(cfg: ExperimentConfig) -> int:
    """The condition's channels as the data sets them (inpainting: the latent's and the mask's)."""
    return cfg.model.in_channels + 1 if cfg.model.condition == "inpaint" else cfg.model.cond_channels


def format_dry_run(r: dict) -> str:
    lines = [f"{r['preset']}: {r['params'] / 1e6:.1f} M parameters, {r['forward_gflops_per_image']:.1f} GFLOP per image "
             f"forward (2 FLOPs per multiply-add), activations {r['activation_mib_per_image']:.1f} MiB per image "
             f"({r['precision']}, activation checkpointing {r['activation_checkpointing']})",
             f"  one step here at batch {r['measured_batch']} ({r['step_precision']}, {r['threads']} threads): "
             f"{r['step_seconds_here']:.2f} s → "
             f"the preset's batch {r['batch']} on this machine ≈ {r['step_seconds_here_at_preset_batch']:.0f} s a step",
             f"  the run: {r['steps']:,} steps × {r['batch']} = {r['train_pflops']:,.0f} PFLOP ≈ "
             f"{r['h100_hours_at_40pct_mfu']:,.0f} H100-hours at 40 % MFU",
             "  memory per GPU at the preset's batch (FSDP2, fp32 states 20 B/param sharded; + activations):"]
    for gpus, m in r["memory_per_gpu"].items():
        lines.append(f"    {gpus:>3} GPUs: micro-batch {m['micro_batch']:>5}, activations {m['activations_gib']:8.2f} GiB + "
                     f"states {m['states_gib']:6.2f} GiB = {m['total_gib']:8.2f} GiB")
    return "\n".join(lines)

