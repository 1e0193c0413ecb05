"""`lfm-fast presets`: list the experiment presets, or print one's full config (JSON)."""

from __future__ import annotations


def add_parser(sub) -> None:
    r = sub.add_parser("presets", help="list the experiment presets, or print one's full config (JSON)")
    r.add_argument("name", nargs="?", metavar="NAME", help="a preset: its whole config, as "
                   "`train --preset NAME` starts from and key=value overrides change")


def run(args):
    import json

    from lfm_fast.config import PRESETS, get_preset, to_dict

    if args.name is not None:
        print(json.dumps(to_dict(get_preset(args.name)), indent=2))
        return
    width = max(map(len, PRESETS))
    for name, cfg in PRESETS.items():
        m = cfg.model
        size = f"{m.input_size}×{m.input_size}×{m.in_channels} latents"
        classes = "classes from the data" if m.num_classes < 0 else f"{m.num_classes} classes"
        cond = f", condition {m.condition}" if m.condition != "none" else (f", {classes}" if m.num_classes else "")
        print(f"{name:<{width}}  {cfg.data.dataset}: {size}, width {m.hidden_size} × depth {m.depth}, patch {m.patch_size}{cond}, "
              f"{cfg.train.steps} steps of {cfg.train.batch_size}")
