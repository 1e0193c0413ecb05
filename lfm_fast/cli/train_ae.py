"""`lfm-fast train-ae`: train the small built-in AutoencoderKL (for data without a pretrained AE)."""

from __future__ import annotations

from lfm_fast.cli.common import add_overwrite_flag, check_positive
from lfm_fast.fileio import check_out_dir


def add_parser(sub) -> None:
    a = sub.add_parser("train-ae", help="train the small built-in AutoencoderKL (for data without a pretrained AE)")
    a.add_argument("--data", required=True, help="'shapes' or an image folder")
    a.add_argument("--out", required=True, help="folder for the diffusers AutoencoderKL (config.json + weights)")
    add_overwrite_flag(a)
    a.add_argument("--steps", type=int, default=800, help="training steps (builtin:shapes was trained 2,500)")
    a.add_argument("--batch-size", type=int, default=16, help="images per step")
    a.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    a.add_argument("--image-size", type=int, default=32, help="images are centre-cropped and resized to this")
    a.add_argument("--num-images", type=int, default=6000, help="shapes only: how many images to draw")
    a.add_argument("--latent-noise", type=float, default=0.0, metavar="SIGMA",
                   help="decode latents + SIGMA·std(latents)·noise while training, so the decoder forgives the small "
                        "latent errors of a generator (builtin:shapes used 0.1)")
    a.add_argument("--scale-equivariance", type=float, default=0.0, metavar="W",
                   help="weight of a second loss: the 2×-downsampled latent must decode to the 2×-downsampled image; "
                        "keeps high frequencies out of the latents, so a generator learns them faster (builtin:shapes used 0.5)")
    a.add_argument("--seed", type=int, default=0, help="seed of the data draw and the training")


def run(args):
    from lfm_fast.autoencoder import train_autoencoder
    from lfm_fast.data import open_image_dataset

    for name in ("steps", "batch_size", "lr", "image_size", "num_images"):
        check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("latent_noise", "scale_equivariance"):
        check_positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_zero=True)
    check_out_dir(args.out, args.overwrite, "train-ae")
    ds, _ = open_image_dataset(args.data, args.image_size, args.num_images, args.seed)
    import torch

    images = torch.stack([ds[i][0] for i in range(len(ds))])
    summary = train_autoencoder(images, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                latent_noise=args.latent_noise, scale_equivariance=args.scale_equivariance,
                                overwrite=args.overwrite)
    print(f"wrote {args.out}: recon_mse={summary['recon_mse']:.4f} scaling_factor={summary['scaling_factor']:.4f}")
