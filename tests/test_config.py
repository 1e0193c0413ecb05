import pytest

from lfm_fast.config import PRESETS, apply_overrides, from_dict, get_preset, to_dict
from lfm_fast.errors import InputError


def test_paper_presets_carry_the_lfm_hyperparameters():
    expect = {"celebahq256-dit-l2": (32, 2e-4, "constant", 0), "ffhq256-dit-l2": (32, 2e-4, "cosine", 0),
              "church256-dit-l2": (96, 1e-4, "constant", 0), "bedroom256-dit-l2": (32, 1e-4, "constant", 0),
              "imagenet256-dit-b2": (1280, 1e-4, "constant", 1000)}
    for name, (bs, lr, sched, classes) in expect.items():
        p = get_preset(name)
        assert (p.train.batch_size, p.train.lr, p.train.lr_schedule, p.model.num_classes) == (bs, lr, sched, classes)
        assert p.model.input_size == 32 and p.model.in_channels == 4 and p.data.autoencoder == "stabilityai/sd-vae-ft-mse"
    inet = get_preset("imagenet256-dit-b2")
    assert inet.train.label_dropout == 0.1 and inet.sample.cfg == 1.5 and inet.model.hidden_size == 768
    assert get_preset("celebahq256-dit-l2").model.depth == 24
    assert "small-data" in PRESETS


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
    from lfm_fast.train.loop import configure_model_for_data

    write_random_latents(tmp_path / "lat", shape=(4, 16, 16), num_classes=3)
    ds = LatentShardDataset(str(tmp_path / "lat"))
    cfg = get_preset("small-data")
    assert cfg.model.num_classes == -1
    configure_model_for_data(cfg, ds)
    assert (cfg.model.num_classes, cfg.model.in_channels, cfg.model.input_size) == (3, 4, 16)
    paper = get_preset("imagenet256-dit-b2")
    with pytest.raises(InputError, match="model.num_classes=1000 but the latents have 3 classes"):
        configure_model_for_data(paper, ds)
