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
    assert "shapes-tiny" in PRESETS


def test_overrides_convert_types_and_reject_bad_keys():
    cfg = apply_overrides(get_preset("shapes-tiny"), ["train.lr=3e-4", "model.qk_norm=true", "ema_decay=0.5", "sample.solver=rk4"])
    assert cfg.train.lr == 3e-4 and cfg.model.qk_norm is True and cfg.train.ema_decay == 0.5 and cfg.sample.solver == "rk4"
    assert get_preset("shapes-tiny").train.lr != 3e-4  # presets are copied, never mutated
    for bad, msg in [("train.nope=1", "names no config field"), ("lr", "expected key=value"),
                     ("train.steps=abc", "expected a int"), ("steps=1", "ambiguous"), ("model.num_tokens=3", "names no")]:
        with pytest.raises(InputError, match=msg):
            apply_overrides(get_preset("shapes-tiny"), [bad])
    with pytest.raises(InputError, match="unknown preset"):
        get_preset("celeba")


def test_config_dict_round_trip():
    cfg = get_preset("imagenet256-dit-b2")
    assert from_dict(to_dict(cfg)) == cfg
