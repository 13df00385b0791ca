"""GIQA: the published GMM (PCA keeping 95% of the variance, 5 components),
the residual variant and KNN on synthetic features, the clear errors, and the
validation on real photos: with the real FID Inception, a reference fitted on
some coco-mini photos, and blur and noise of *other* photos scored."""
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
    with_res = GMMGIQA(1, pca_dim=6, residual=True).fit(ref).score(steps)
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


def test_the_published_pca_keeps_95_percent_of_the_variance_as_sklearn_does():
    from sklearn.decomposition import PCA

    ref, _ = low_rank_reference(n=300, dim=40, rank=8)
    ref = ref * np.linspace(0.5, 2.0, 40)  # unequal axes: the 95% cut falls inside the spectrum
    giqa = make_giqa("gmm").fit(ref)
    assert giqa.describe()["n_components"] == 5 and giqa.describe()["pca_variance"] == 0.95
    assert giqa.pca_dim_used == PCA(0.95, svd_solver="full").fit(ref).n_components_
    assert giqa.explained_variance >= 0.95
    fewer = GMMGIQA(pca_dim=giqa.pca_dim_used - 1, pca_variance=None).fit(ref)
    assert fewer.explained_variance < 0.95  # the fewest axes that reach it


def test_the_published_score_is_the_log_likelihood_in_pca_space():
    """Reference computed another way: sklearn's PCA, then a 5-component full-covariance mixture on its output."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    ref, _ = low_rank_reference(n=300, dim=40, rank=8)
    query = ref[:20] * 1.5 + 0.1
    pca = PCA(0.95, svd_solver="full").fit(ref)
    gmm = GaussianMixture(5, covariance_type="full", reg_covar=1e-4, random_state=0).fit(pca.transform(ref))
    want = gmm.score_samples(pca.transform(query))
    # the mixture's k-means start sees sign-flipped axes here and there: same density up to EM's tolerance
    np.testing.assert_allclose(make_giqa("gmm").fit(ref).score(query), want, rtol=0.02, atol=0.5)


def test_the_residual_variant_and_old_descriptions_rebuild():
    from pipeline.metrics.giqa import from_description

    ref, _ = low_rank_reference(n=60)
    res = make_giqa("gmm-residual", n_components=2).fit(ref)
    assert res.residual and res.describe()["method"] == "gmm-residual"
    again = from_description(res.describe()).fit(ref)
    np.testing.assert_allclose(again.score(ref[:5]), res.score(ref[:5]))
    # a scored set written before issue 18: 64 PCA dims, residual on (not recorded then), no pca_variance key
    old = from_description({"method": "gmm", "n_components": 2, "pca_dim": 64, "reg_covar": 1e-4, "seed": 0})
    assert old.residual and old.pca_dim == 64 and old.pca_variance is None
    with pytest.raises(ValueError, match="--pca-variance 1.5 must be in \\(0, 1\\]"):
        make_giqa("gmm", pca_variance=1.5)


# ---------------------------------------------------------------------------
# validation: real photos, real Inception, a reference that does not hold them
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_features(shared_data):
    torch = pytest.importorskip("torch")
    from data.images import list_images
    from pipeline.metrics.giqa_validation import distortion_features

    torch.set_num_threads(2)
    return distortion_features(list_images(shared_data / "coco-mini" / "images"))


@pytest.mark.slow
def test_giqa_on_held_out_photos(coco_features):
    """Fit on 16 coco-mini photos, score blur and noise of the other 16 (and the other way round). The figures
    (benchmarks/results/giqa_validation.json, benchmarks/giqa_validation.py) are recomputed and the bounds
    below are what they support: with 16 reference photos the published 5-component mixture in its ~13-d PCA
    space orders degradations of unseen photos barely better than chance (monotone for 3/32 and 6/32 photos,
    pairwise 54%), while fitted on the photos it scores it looks excellent (84% / 97% monotone): the old
    in-sample check said nothing about unseen images. KNN-GIQA, the paper's alternative, generalizes better."""
    import json
    from pathlib import Path

    from pipeline.metrics.giqa_validation import validate

    published = validate(lambda: make_giqa("gmm"), coco_features)
    knn = validate(lambda: make_giqa("knn"), coco_features)
    for kind in ("blur", "noise"):
        held, fitted = published["halves"][kind], published["in_sample"][kind]
        print(f"{kind}: published GMM held out {held}, in sample {fitted}; KNN held out {knn['halves'][kind]}")
        assert held["n_photos"] == 32 and held["monotone_fraction"] > 1 / 24 and held["pairwise_fraction"] > 0.5
        assert fitted["monotone_fraction"] >= 0.8
        assert knn["halves"][kind]["monotone_fraction"] >= 0.25 and knn["halves"][kind]["pairwise_fraction"] >= 0.6
    recorded = json.loads((Path(__file__).parent.parent / "benchmarks/results/giqa_validation.json").read_text())
    row = recorded["variants"]["gmm (published: PCA 95%, 5 components)"]
    assert row["describe"] == published["describe"]
    for split in ("halves", "leave_one_out", "in_sample"):
        for kind in ("blur", "noise"):
            assert row[split][kind] == pytest.approx(published[split][kind], abs=1e-9)
