"""Training throughput, every comparison side by side in one run.

1. The DiT-S/2 step (4×32×32 latents, batch 16, bf16 autocast, AdamW): ours (eager and torch.compile)
   beside diffusers' DiTTransformer2DModel of the same size, and the bf16 GEMM peak of this machine
   measured at the model's own shapes (for MFU).
2. End to end against the stock LFM recipe at 64×64 images: the paper's code encodes every batch with
   the VAE on the fly in fp32 eager (here: diffusers AutoencoderKL with SD-VAE's architecture, f=8, at
   half width, and diffusers' DiT-S/2); ours trains on cached latents through the trainer's own FSDP2
   path (bf16 compute, per-block torch.compile, fused AdamW).

FLOPs: `lfm_fast.train.throughput.train_flops_per_image` (training = 3 × forward, 2 per multiply-add,
attention included); the VAE's encode is not counted as model FLOPs.
"""

import os

import pytest
import torch

from lfm_fast.config import TrainConfig
from lfm_fast.flow import FlowConfig, flow_matching_loss
from lfm_fast.models.dit import DiTConfig, arch_config, build_dit
from lfm_fast.train.throughput import train_flops_per_image

BATCH = 16
RECIPE_BATCH = 32
SD_VAE_HALF_WIDTH = (64, 128, 256, 256)  # SD-VAE: (128, 256, 512, 512), 2 resnets per level, f = 8


class DiffusersDiT(torch.nn.Module):
    """diffusers' DiT-S/2 with our call signature (velocity output, t ∈ [0, 1] scaled like ours)."""

    def __init__(self, sample_size: int):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.net = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4,
                                         num_layers=12, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000)
        self.config = type("C", (), {"num_classes": 1000})()

    def forward(self, x, t, y=None, cond=None):
        return self.net(x, timestep=t * 1000, class_labels=y).sample


def s2_config(latent_size: int) -> DiTConfig:
    return DiTConfig(**arch_config("DiT-S/2"), input_size=latent_size, in_channels=4, num_classes=1000)


def make(kind):
    torch.manual_seed(0)
    if kind == "diffusers":
        return DiffusersDiT(32)
    model = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    return torch.compile(model) if kind == "ours_compile" else model


@pytest.mark.parametrize("kind", ["ours", "ours_compile", "diffusers"])
def test_train_step_dit_s2(benchmark, kind):
    model = make(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(BATCH, 4, 32, 32), torch.randint(0, 1000, (BATCH,))
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = flow_matching_loss(model, x, y, FlowConfig(), g, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    benchmark.pedantic(step, rounds=3, iterations=1)
    s = benchmark.stats.stats.mean
    benchmark.extra_info.update(kind=kind, img_per_s=BATCH / s, tflops=train_flops_per_image(s2_config(32)) * BATCH / s / 1e12)


def test_bf16_gemm_peak(benchmark):
    """The peak that MFU is measured against: bf16 matmuls at DiT-S/2's token-wise linear shapes."""
    tokens, d = BATCH * 256, 384
    shapes = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d)]
    mats = [(torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def run():
        for a, b in mats:
            torch.mm(a, b)

    run()
    benchmark.pedantic(run, rounds=10, iterations=3)
    benchmark.extra_info.update(kind="gemm_peak", tflops=flops / benchmark.stats.stats.mean / 1e12)


def stock_recipe_step():
    """LFM's own loop: every batch of images goes through the VAE encoder (fp32, eager), then the DiT."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=SD_VAE_HALF_WIDTH,
                        layers_per_block=2, latent_channels=4, sample_size=64).eval()
    model = DiffusersDiT(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, y = torch.rand(RECIPE_BATCH, 3, 64, 64) * 2 - 1, torch.randint(0, 1000, (RECIPE_BATCH,))
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.no_grad():
            x0 = vae.encode(images).latent_dist.sample(generator=g) * 0.18215
        loss = flow_matching_loss(model, x0, y, FlowConfig(), g, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def our_recipe_step():
    """Ours: latents cached once by `lfm-fast prepare`; the DiT built, sharded and compiled as the trainer does."""
    from lfm_fast.dist import init_distributed
    from lfm_fast.train.step import make_optimizer
    from lfm_fast.train.parallelize import build_parallel_dit

    d = init_distributed("cpu")
    model = build_parallel_dit(s2_config(8), d.mesh, d.device, "bf16", compile_blocks=True, seed=0)
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    cached = torch.randn(4 * RECIPE_BATCH, 4, 8, 8)
    y = torch.randint(0, 1000, (RECIPE_BATCH,))
    g = torch.Generator().manual_seed(0)

    def step():
        x0 = cached[torch.randint(0, len(cached), (RECIPE_BATCH,), generator=g)]
        loss = flow_matching_loss(model, x0, y, FlowConfig(), g, 0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("kind", ["stock_lfm", "ours"])
def test_recipe_end_to_end_64px(benchmark, kind):
    step = stock_recipe_step() if kind == "stock_lfm" else our_recipe_step()
    for _ in range(3):  # warm-up (ours: compiles the block here)
        step()
    benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info.update(kind=f"recipe_{kind}", img_per_s=RECIPE_BATCH / benchmark.stats.stats.mean)


@pytest.mark.parametrize("sharding", ["plain", "fsdp2"])
def test_small_data_step_world_of_one(benchmark, sharding):
    """The demo's DiT (small-data preset, batch 32, fp32) on one process: the trainer leaves a world of one
    unsharded (`plain`); `fsdp2` is what it did before (all-gather/reduce-scatter copies per block, DTensor
    dispatch in clipping, AdamW and EMA)."""
    from lfm_fast.config import get_preset
    from lfm_fast.dist import init_distributed
    from lfm_fast.train.parallelize import apply_fsdp, build_parallel_dit

    d = init_distributed("cpu")
    cfg = get_preset("small-data")
    cfg.model.num_classes = 6
    model = build_parallel_dit(cfg.model, d.mesh, d.device, "fp32", seed=0)
    if sharding == "fsdp2":
        apply_fsdp(model, d.mesh, "fp32")
    x0, y = torch.randn(32, 4, 8, 8), torch.randint(0, 6, (32,))
    g = torch.Generator().manual_seed(0)
    run_small_data_steps(benchmark, model, cfg.train, lambda: flow_matching_loss(model, x0, y, cfg.flow, g, 0.1), rounds=30)
    benchmark.extra_info["images_per_step"] = 32


def run_small_data_steps(benchmark, model, tc, loss_fn, rounds: int) -> None:
    """The trainer's step around `loss_fn()` (backward, clipping, fused AdamW, EMA), warmed up, then benchmarked."""
    from lfm_fast.train.ema import create_ema, update_ema
    from lfm_fast.train.step import make_optimizer

    opt, ema = make_optimizer(model, tc), create_ema(model)

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.01)

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=rounds, iterations=1)


@pytest.mark.parametrize("source", ["stored", "encoded"])
def test_inpaint_condition_stored_vs_encoded(benchmark, source):
    """Where inpainting's masked-image latents come from, at the shapes-inpaint recipe (batch 32, fp32, the shipped
    builtin:shapes AE): `stored` gathers them from what `prepare --inpaint-masks K` cached (our choice); `encoded`
    runs the AE encoder on the masked images every step, as LFM's code does (masks drawn ahead, as data-loader
    workers would)."""
    from lfm_fast.autoencoder import encode, load_autoencoder
    from lfm_fast.config import get_preset
    from lfm_fast.data.masks import make_masks, masked_image_condition
    from lfm_fast.dist import init_distributed
    from lfm_fast.models.dit import DiTConfig
    from lfm_fast.train.parallelize import build_parallel_dit

    d = init_distributed("cpu")
    cfg = get_preset("shapes-inpaint")
    cfg.model = DiTConfig(**{**cfg.model.__dict__, "cond_channels": 5})
    model = build_parallel_dit(cfg.model, d.mesh, d.device, "fp32", seed=0)
    ae = load_autoencoder("builtin:shapes")
    images = torch.rand(32, 3, 32, 32) * 2 - 1
    holes = torch.from_numpy(make_masks(32, 32, 0, (0.1, 0.6)))
    stored = torch.cat(masked_image_condition(ae, images, holes, 4), dim=1)
    x0 = encode(ae, images)
    g = torch.Generator().manual_seed(0)

    def loss():
        if source == "stored":
            cond = stored[torch.randperm(32, generator=g)]  # a gather, as from the memory-mapped shards
        else:
            cond = torch.cat(masked_image_condition(ae, images, holes, 4), dim=1)
        return flow_matching_loss(model, x0, None, cfg.flow, g, cond=cond, cond_dropout=0.1)

    run_small_data_steps(benchmark, model, cfg.train, loss, rounds=20)
    benchmark.extra_info.update(kind=f"inpaint_{source}", img_per_s=32 / benchmark.stats.stats.mean)


@pytest.fixture(scope="module")
def shapes_latents(tmp_path_factory):
    from lfm_fast.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("aug") / "latents"
    prepare_latents("builtin:shapes", "shapes", str(out), num_images=1024, progress=False)
    return str(out)


@pytest.mark.parametrize("augment", ["mean", "flip+posterior"])
def test_augmentation_cost(benchmark, shapes_latents, augment):
    """The paper's augmentation at the demo's recipe (small-data, batch 32, fp32), reading `prepare`'s shards as the
    trainer does: `mean` gathers the posterior means; `flip+posterior` draws a flip and ε per sample from the step's
    generator and gathers the mirror images' means and both stds (data.flip=true data.posterior=sample)."""
    from lfm_fast.config import get_preset
    from lfm_fast.data.latents import LatentShardDataset
    from lfm_fast.dist import init_distributed
    from lfm_fast.train.step import EpochSampler, draw_augmentation, step_generator
    from lfm_fast.train.parallelize import build_parallel_dit

    d = init_distributed("cpu")
    cfg = get_preset("small-data")
    cfg.model.num_classes = 6
    cfg.data.flip, cfg.data.posterior = (True, "sample") if augment != "mean" else (False, "mean")
    ds = LatentShardDataset(shapes_latents)
    cfg.model.in_channels, cfg.model.input_size = ds.latent_shape[0], ds.latent_shape[1]
    model = build_parallel_dit(cfg.model, d.mesh, d.device, "fp32", seed=0)
    sampler, g, step = EpochSampler(len(ds), 0), torch.Generator().manual_seed(0), [0]

    def loss():
        idx = sampler.indices(32 * step[0], 32)
        flips, eps = draw_augmentation(32, ds.latent_shape, cfg.data, step_generator(0, 3, step[0]))
        x0, y = ds.get_batch(idx, flips, eps)
        step[0] += 1
        return flow_matching_loss(model, x0, y, cfg.flow, g, 0.1)

    run_small_data_steps(benchmark, model, cfg.train, loss, rounds=40)
    shard = os.path.join(shapes_latents, ds.meta["shards"][0]["file"])
    from lfm_fast.data.latents import mmap_safetensors

    tensors = mmap_safetensors(shard)
    per_image = {k: v[0].nbytes for k, v in tensors.items() if k.startswith("latents")}
    benchmark.extra_info.update(kind=f"augment_{augment}", img_per_s=32 / benchmark.stats.stats.mean,
                                latent_bytes_per_image=sum(per_image.values()) if augment != "mean" else per_image["latents"])
