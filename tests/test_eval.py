import numpy as np
import pytest
import torch

from lfm_fast.errors import InputError
from lfm_fast.eval.fid import inception_features, load_images, load_inception, reference_stats
from lfm_fast.eval.frechet import frechet_distance


def random_stats(rng, d):
    a = rng.normal(size=(3 * d, d))
    return rng.normal(size=d), a.T @ a / (3 * d)


def frechet_by_eigenvalues(m1, s1, m2, s2):
    """An independent route: Tr((Σ₁Σ₂)^½) = Σ √λᵢ(Σ₁Σ₂), the eigenvalues of a product of PSD matrices being ≥ 0."""
    lam = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_frechet_distance_against_an_eigenvalue_computation():
    rng = np.random.default_rng(0)
    for d in (2, 16, 64):
        (m1, s1), (m2, s2) = random_stats(rng, d), random_stats(rng, d)
        ours, theirs = frechet_distance(m1, s1, m2, s2), frechet_by_eigenvalues(m1, s1, m2, s2)
        assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-6
    # 1-D closed form: (μ₁ − μ₂)² + (σ₁ − σ₂)²
    assert abs(frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-9


def pytorch_fid_frechet():
    """pytorch-fid's own `calculate_frechet_distance`. Its module imports torchvision at the top, and no
    torchvision wheel on this machine's registry loads with torch 2.13+cpu (its C ops fail to register), so
    the module is imported with torchvision stubbed: the function itself uses only numpy and scipy.
    (`make install` installs pytorch-fid with --no-deps for the same reason.)"""
    import importlib
    import sys
    import types

    names = ("torchvision", "torchvision.transforms", "torchvision.models", "torchvision.models.inception")
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["torchvision"].transforms, stubs["torchvision"].models = stubs["torchvision.transforms"], stubs["torchvision.models"]
    stubs["torchvision.models"].inception = stubs["torchvision.models.inception"]
    stubs["torchvision.models.inception"].__getattr__ = lambda name: torch.nn.Module  # base classes, never run
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("pytorch_fid.fid_score").calculate_frechet_distance
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def test_frechet_distance_equals_pytorch_fids():
    reference = pytorch_fid_frechet()
    rng = np.random.default_rng(1)
    for d in (8, 64, 256):
        (m1, s1), (m2, s2) = random_stats(rng, d), random_stats(rng, d)
        ours, theirs = frechet_distance(m1, s1, m2, s2), reference(m1, s1, m2, s2)
        assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    # a singular product (rank-deficient covariances) goes through the same ε-guard in both
    a = rng.normal(size=(4, 32))
    s = a.T @ a
    assert abs(frechet_distance(m1[:32], s, m2[:32], s) - reference(m1[:32], s, m2[:32], s)) <= 1e-6 * reference(m1[:32], s, m2[:32], s)


def test_inception_features_shapes_determinism_and_batching(random_inception):
    path, _ = random_inception
    net = load_inception(path)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    a = inception_features(net, images, batch_size=2, progress=False)
    b = inception_features(load_inception(path), images, batch_size=3, progress=False)
    assert a.shape == (3, 2048) and np.isfinite(a).all() and (a >= 0).all()  # pool3 follows a ReLU
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_load_inception_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LFM_FAST_INCEPTION", raising=False)
    with pytest.raises(InputError, match="pt_inception-2015-12-05"):
        load_inception(None)
    with pytest.raises(InputError, match="no such file"):
        load_inception(str(tmp_path / "missing.pth"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not the FID InceptionV3 weights"):
        load_inception(str(tmp_path / "other.pth"))


def test_eval_checks_weights_and_files_before_reading_images(tmp_path, monkeypatch, capsys):
    """A missing --inception is reported before any image is read (where the file comes from, in the line); a text
    file named .npz and a truncated samples.npz are one line each, not a traceback."""
    from lfm_fast.cli import main
    from lfm_fast.eval import run as eval_run

    monkeypatch.delenv("LFM_FAST_INCEPTION", raising=False)
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    read = []
    monkeypatch.setattr(eval_run, "load_images", lambda *a, **k: read.append(a) or np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert read == [] and len(err.splitlines()) == 1 and "github.com/mseitzer/pytorch-fid/releases" in err
    monkeypatch.undo()
    (tmp_path / "text.npz").write_text("not a zip")
    with open(tmp_path / "a.npz", "rb") as f:
        (tmp_path / "cut.npz").write_bytes(f.read()[:200])
    for bad in ("text.npz", "cut.npz"):
        with pytest.raises(InputError, match=f"{bad}: not a readable .npz file"):
            load_images(str(tmp_path / bad))
        with pytest.raises(InputError, match=f"{bad}: not a readable .npz file"):
            reference_stats(str(tmp_path / bad))


def test_precision_recall_on_known_geometry():
    from lfm_fast.eval.precision_recall import precision_recall

    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 2))
    assert precision_recall(real, rng.normal(size=(400, 2)))["precision"] > 0.9
    # fakes collapsed onto one mode: precise, but they cover little of the real set
    collapsed = precision_recall(real, 0.05 * rng.normal(size=(400, 2)))
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.3
    # fakes far away: neither
    far = precision_recall(real, rng.normal(size=(400, 2)) + 10)
    assert far["precision"] == 0 and far["recall"] == 0


def test_cli_eval_end_to_end(random_inception, tiny_pipeline, tmp_path, capsys):
    import json

    from lfm_fast.cli import main
    from lfm_fast.data.shapes import make_shapes

    path, _ = random_inception
    a, b = make_shapes(12, 32, seed=1)[0], make_shapes(12, 32, seed=2)[0]
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    out = tmp_path / "m.json"
    args = ["eval", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--inception", path,
            "--ae", str(tiny_pipeline / "ae"), "--metrics", "fid,pr,latent_fd", "--save-stats", str(tmp_path / "s.npz"),
            "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert {"fid", "precision", "recall", "latent_fd"} <= result.keys() and result["num_samples"] == 12
    # each value is the metric of the samples (a) against the reference (b), recomputed here from the features: the
    # FID by pytorch-fid's own formula, precision (the fakes on the real manifold) and recall (the other way round)
    # by k = 3 radii, the latent FD on the AE's latents. A swapped pair, a wrong k or layer gives other values
    from lfm_fast.autoencoder import encode, load_autoencoder
    from lfm_fast.data.images import to_tensor
    from lfm_fast.eval.frechet import gaussian_stats
    from lfm_fast.eval.precision_recall import precision_recall
    from lfm_fast.eval.run import evaluate

    net = load_inception(path)
    fa, fb = (inception_features(net, x, 50, progress=False) for x in (a, b))
    assert result["fid"] == pytest.approx(pytorch_fid_frechet()(*gaussian_stats(fa), *gaussian_stats(fb)), rel=1e-6)
    pr = precision_recall(fb, fa, k=3)
    assert (result["precision"], result["recall"]) == (pr["precision"], pr["recall"]) and pr["precision"] != pr["recall"]
    ae = load_autoencoder(str(tiny_pipeline / "ae"))
    la, lb = (encode(ae, to_tensor(x)).numpy() for x in (a, b))
    assert result["latent_fd"] == pytest.approx(pytorch_fid_frechet()(*gaussian_stats(lb), *gaussian_stats(la)), rel=1e-6)
    assert result["fid"] > 10 and result["latent_fd"] > 0  # two sets of shapes: ~100
    # --save-stats wrote the samples' statistics; a statistics file as --ref gives the FID its images give (the
    # reference's statistics saved the same way: the same matrices, so the same value to the last bit)
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_allclose(f["mu"], gaussian_stats(fa)[0], rtol=1e-12)
        np.testing.assert_allclose(f["sigma"], gaussian_stats(fa)[1], rtol=1e-12, atol=1e-15)
    evaluate(str(tmp_path / "b.npz"), str(tmp_path / "b.npz"), [], path, save_stats=str(tmp_path / "sb.npz"), progress=False)
    assert main(["eval", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "sb.npz"), "--inception", path]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == result["fid"]
    assert main(["eval", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "s.npz"), "--metrics", "pr",
                 "--inception", path]) == 2
    assert "statistics only" in capsys.readouterr().err


def test_an_adm_reference_batch_gives_its_stats_to_fid_and_its_images_to_pr(random_inception, tmp_path):
    """VIRTUAL_imagenet256_labeled.npz holds arr_0 and mu/sigma: FID against its statistics (as ADM's evaluator),
    precision/recall on its images; a stats-only file asked for pr is refused before any features are computed."""
    from lfm_fast.data.shapes import make_shapes
    from lfm_fast.eval.run import evaluate

    path, _ = random_inception
    a, b = make_shapes(12, 32, seed=1)[0], make_shapes(12, 32, seed=2)[0]
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    for x, stats in (("a", "sa"), ("b", "sb")):  # each set's statistics, as --save-stats writes them
        evaluate(str(tmp_path / f"{x}.npz"), str(tmp_path / "b.npz"), [], path, save_stats=str(tmp_path / f"{stats}.npz"), progress=False)
    (mu_a, _), (mu_b, sigma_b) = ((f["mu"], f["sigma"]) for f in (np.load(tmp_path / "sa.npz"), np.load(tmp_path / "sb.npz")))
    # statistics that are not its images': b's covariance with its mean moved by 1 (b's images give another FID)
    np.savez(tmp_path / "adm.npz", arr_0=b, mu=mu_b + 1, sigma=sigma_b)
    both = evaluate(str(tmp_path / "a.npz"), str(tmp_path / "adm.npz"), ["fid", "pr"], path, progress=False)
    images = evaluate(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), ["fid", "pr"], path, progress=False)
    moved = images["fid"] - ((mu_a - mu_b) ** 2).sum() + ((mu_a - mu_b - 1) ** 2).sum()  # only the mean's term changes
    assert both["fid"] == pytest.approx(moved, rel=1e-9) and abs(moved - images["fid"]) > 100
    assert both["precision"] == images["precision"] and both["num_reference"] == 12
    with pytest.raises(InputError, match="holds statistics only"):
        evaluate(str(tmp_path / "a.npz"), str(tmp_path / "sa.npz"), ["pr"], "/nonexistent/inception.pth", progress=False)
