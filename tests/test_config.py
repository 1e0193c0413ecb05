import pytest

from lfm_fast.config import apply_overrides, from_dict, get_preset, to_dict
from lfm_fast.errors import InputError


# The LFM code's recipes (VinAIResearch/LFM bash_scripts/run.sh, args/ and test_args/, train_flow_latent.py; DiT's
# train.py for DiT-XL/2), field by field: arch, data SPEC, batch, lr, schedule, lr_min, period (epochs), steps,
# EMA decay (0: raw weights, as LFM evaluates), clip (0: none), weight decay, label dropout, cond dropout, flip,
# posterior, solver, atol, rtol, CFG.
PAPER = {
    "celebahq256-dit-l2": ("DiT-L/2", "lmdb:data/celeba/celeba-lmdb", 32, 2e-4, "cosine_epoch", 1e-5, 500, 475 * 843,
                           0.0, 0.0, 0.0, 0.0, 0.0, True, "sample", "dopri5", 1e-5, 1e-5, 1.0),
    "ffhq256-dit-l2": ("DiT-L/2", "lmdb:data/ffhq/ffhq-lmdb", 32, 2e-4, "cosine_epoch", 1e-5, 500, 475 * 1968,
                       0.0, 0.0, 0.0, 0.0, 0.0, True, "sample", "dopri5", 1e-5, 1e-5, 1.0),
    "church256-dit-l2": ("DiT-L/2", "lmdb:data/lsun/church_outdoor_train_lmdb?limit=120000", 96, 1e-4, "constant", 0.0, 0,
                         575 * 1250, 0.0, 0.0, 0.0, 0.0, 0.0, True, "sample", "dopri5", 1e-5, 1e-5, 1.0),
    "bedroom256-dit-l2": ("DiT-L/2", "lmdb:data/lsun/bedroom_train_lmdb?limit=120000", 32, 1e-4, "constant", 0.0, 0,
                          550 * 3750, 0.0, 0.0, 0.0, 0.0, 0.0, True, "sample", "dopri5", 1e-5, 1e-5, 1.0),
    "imagenet256-dit-b2": ("DiT-B/2", "data/imagenet/train", 1280, 1e-4, "constant", 0.0, 0, 875 * 1000,
                           0.0, 0.0, 0.0, 0.1, 0.0, True, "sample", "dopri5", 1e-5, 1e-5, 1.5),
    "imagenet256-dit-xl2": ("DiT-XL/2", "data/imagenet/train", 256, 1e-4, "constant", 0.0, 0, 7_000_000,
                            0.9999, 0.0, 0.0, 0.1, 0.0, True, "sample", "dopri5", 1e-5, 1e-5, 1.5),
    "celebahq256-inpaint": ("DiT-L/2", "data/celeba_hq_256/train", 128, 5e-5, "cosine_epoch", 1e-5, 500, 500 * 188,
                            0.0, 0.0, 0.0, 0.0, 0.0, False, "sample", "dopri5", 1e-5, 1e-5, 1.0),
    "celebahq256-semantic": ("DiT-L/2", "celebamask:data/CelebAMask-HQ", 128, 5e-5, "cosine_epoch", 1e-5, 175, 175 * 210,
                             0.0, 0.0, 0.0, 0.0, 0.0, False, "sample", "dopri5", 1e-5, 1e-5, 1.0),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_carry_the_lfm_codes_recipe(name):
    from lfm_fast.models.dit import arch_config

    p = get_preset(name)
    t, d, s = p.train, p.data, p.sample
    arch = next(a for a in ("DiT-B/2", "DiT-L/2", "DiT-XL/2") if all(getattr(p.model, k) == v for k, v in arch_config(a).items()))
    assert (arch, d.dataset, t.batch_size, t.lr, t.lr_schedule, t.lr_min, t.lr_period_epochs, t.steps, t.ema_decay,
            t.grad_clip, t.weight_decay, t.label_dropout, t.cond_dropout, d.flip, d.posterior, s.solver, s.atol, s.rtol,
            s.cfg) == PAPER[name]
    assert (p.model.input_size, p.model.in_channels, d.image_size, d.autoencoder) == (32, 4, 256, "stabilityai/sd-vae-ft-mse")
    assert t.warmup_steps == 0 and t.grad_accum == 1 and p.flow.sigma_min == 1e-5 and p.flow.time_sampling == "uniform"
    assert p.model.num_classes == (1000 if "imagenet" in name else 0)
    assert p.model.condition == {"celebahq256-inpaint": "inpaint", "celebahq256-semantic": "semantic"}.get(name, "none")
    if p.model.condition == "semantic":
        assert (p.model.semantic_classes, p.model.cond_stages, p.model.cond_channels) == (19, 3, 4)


def test_overrides_convert_types_and_reject_bad_keys():
    cfg = apply_overrides(get_preset("small-data"), ["train.lr=3e-4", "model.qk_norm=true", "ema_decay=0.5", "sample.solver=rk4"])
    assert cfg.train.lr == 3e-4 and cfg.model.qk_norm is True and cfg.train.ema_decay == 0.5 and cfg.sample.solver == "rk4"
    assert get_preset("small-data").train.lr != 3e-4  # presets are copied, never mutated
    for bad, msg in [("train.nope=1", "names no config field"), ("lr", "expected key=value"),
                     ("train.steps=abc", "expected an int"), ("steps=1", "ambiguous"), ("model.num_tokens=3", "names no")]:
        with pytest.raises(InputError, match=msg):
            apply_overrides(get_preset("small-data"), [bad])
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("celeba")


def test_config_dict_round_trip():
    cfg = get_preset("imagenet256-dit-b2")
    assert from_dict(to_dict(cfg)) == cfg


def test_small_data_preset_takes_the_class_count_from_the_data_paper_presets_refuse_a_mismatch(tmp_path):
    from tests.conftest import write_random_latents

    from lfm_fast.data.latents import LatentShardDataset
    from lfm_fast.train.step import configure_model_for_data

    write_random_latents(tmp_path / "lat", shape=(4, 16, 16), num_classes=3)
    ds = LatentShardDataset(str(tmp_path / "lat"))
    cfg = get_preset("small-data")
    assert cfg.model.num_classes == -1
    configure_model_for_data(cfg, ds)
    assert (cfg.model.num_classes, cfg.model.in_channels, cfg.model.input_size) == (3, 4, 16)
    paper = get_preset("imagenet256-dit-b2")
    with pytest.raises(InputError, match="model.num_classes=1000 but the latents have 3 classes"):
        configure_model_for_data(paper, ds)
