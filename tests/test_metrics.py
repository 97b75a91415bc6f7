import pytest
import torch

import metrics
import synth
from metrics import (attribute_accuracy, fd_score, frechet_distance, frechet_distance_from_stats,
                     gaussian_stats, load_classifier, real_images, save_classifier, shuffle_pixels,
                     train_classifier)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fd_identical_gaussians_is_zero():
    mu, cov = torch.randn(16, dtype=torch.float64), random_cov(16, 0)
    assert abs(frechet_distance_from_stats(mu, cov, mu, cov)) < 1e-9


def test_fd_mean_shift_is_squared_norm():
    cov, d = random_cov(16, 1), torch.randn(16, dtype=torch.float64)
    mu = torch.zeros(16, dtype=torch.float64)
    assert frechet_distance_from_stats(mu, cov, mu + d, cov) == pytest.approx(float(d @ d), abs=1e-9)
    # Same on samples: shifting every feature by d leaves the covariance exactly as it was.
    feats = torch.randn(300, 16, dtype=torch.float64)
    assert frechet_distance(feats, feats + d) == pytest.approx(float(d @ d), abs=1e-8)


def test_fd_diagonal_closed_form():
    a, b = torch.rand(32, dtype=torch.float64) + 0.01, torch.rand(32, dtype=torch.float64) + 0.01
    mu_a, mu_b = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    expected = ((mu_a - mu_b) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert frechet_distance_from_stats(mu_a, torch.diag(a), mu_b, torch.diag(b)) == pytest.approx(float(expected))


def test_fd_general_against_eig_of_product_and_rank_deficient():
    """tr (AB)^1/2 from the eigenvalues of the non-symmetric AB (real, >= 0) agrees; rank-deficient
    sample covariances (N < D) give a finite, non-negative distance."""
    ca, cb = random_cov(8, 2), random_cov(8, 3)
    tr = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    z = torch.zeros(8, dtype=torch.float64)
    expected = ca.trace() + cb.trace() - 2 * tr
    assert frechet_distance_from_stats(z, ca, z, cb) == pytest.approx(float(expected))
    fa, fb = torch.randn(10, 64), torch.randn(12, 64)
    mu, cov = gaussian_stats(fa)
    assert cov.shape == (64, 64) and torch.allclose(cov, torch.cov(fa.double().T))
    assert 0 <= frechet_distance(fa, fb) < float("inf")


@pytest.fixture(scope="module")
def tiny_classifier():
    """About 15 s on one core: 32 px, width 12, 300 steps of 48 images (the default is 1500 of 64)."""
    return train_classifier(size=32, steps=300, seed=synth.TRAIN_SEED, batch=48, width=12, lr=3e-3)


@pytest.fixture(scope="module")
def heldout():
    return real_images(synth.VAL_SEED, 400, 32), real_images(synth.TEST_SEED, 400, 32)


def test_classifier_beats_chance_on_heldout(tiny_classifier, heldout):
    (images, labels), _ = heldout
    acc = attribute_accuracy(tiny_classifier, images, labels)
    chance = {n: 1 / len(synth.VOCAB[n]) for n in synth.ATTRIBUTES}
    # Measured 1.0 / 1.0 / 1.0 / 0.97 colour / 0.83 shape here (the full 1500-step classifier: all 1.0).
    assert all(acc[n] > 0.9 for n in ("background", "position", "size")), acc
    assert all(acc[n] > chance[n] + 0.3 for n in synth.ATTRIBUTES), acc
    assert acc["mean"] == pytest.approx(sum(acc[n] for n in synth.ATTRIBUTES) / 5)
    # Shuffled labels: the same predictions scored against someone else's labels -> about chance.
    g = torch.Generator().manual_seed(0)
    shuffled = {n: v[torch.randperm(len(v), generator=g)] for n, v in labels.items()}
    acc_shuffled = attribute_accuracy(tiny_classifier, images, shuffled)
    assert all(acc_shuffled[n] < chance[n] + 0.1 for n in synth.ATTRIBUTES), acc_shuffled


def test_fd_real_vs_heldout_below_corrupted(tiny_classifier, heldout):
    (val, _), (test, _) = heldout
    fd_real = fd_score(tiny_classifier, val, test)
    fd_shuffled = fd_score(tiny_classifier, val, shuffle_pixels(test))
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = fd_score(tiny_classifier, val, noise)
    assert 0 <= fd_real < fd_shuffled / 5 and fd_real < fd_noise / 5, (fd_real, fd_shuffled, fd_noise)
    # 64 px images are resized to the classifier's 32 px: still close to the 32 px real ones.
    val64, _ = real_images(synth.VAL_SEED, 400, 64)
    assert fd_score(tiny_classifier, val64, test) < fd_shuffled / 5


def test_shuffle_pixels_keeps_histogram():
    x = real_images(synth.VAL_SEED, 2, 32)[0]
    y = shuffle_pixels(x)
    assert not torch.equal(x, y)
    for a, b in zip(x, y):  # the same multiset of RGB pixels, (H*W, 3) rows
        ua, ub = (torch.unique(img.flatten(1).T, dim=0, return_counts=True) for img in (a, b))
        assert torch.equal(ua[0], ub[0]) and torch.equal(ua[1], ub[1])


def test_save_load_roundtrip(tiny_classifier, tmp_path, heldout):
    (images, _), _ = heldout
    path = tmp_path / "cls.safetensors"
    save_classifier(tiny_classifier, path, note="test")
    loaded = load_classifier(path)
    assert loaded.cfg == tiny_classifier.cfg and not loaded.training
    feats = metrics.extract_features(loaded, images[:16])
    assert feats.shape == (16, 128) and torch.equal(feats, metrics.extract_features(tiny_classifier, images[:16]))


def test_train_rejects_heldout_seed():
    with pytest.raises(ValueError):
        train_classifier(steps=1, seed=synth.VAL_SEED)


def test_update_results_replaces_only_its_section(tmp_path):
    p = tmp_path / "RESULTS.md"
    metrics.update_results(p, "a", "## A\nfirst")
    metrics.update_results(p, "b", "## B\nkept")
    metrics.update_results(p, "a", "## A\nsecond")
    text = p.read_text()
    assert "second" in text and "first" not in text and "kept" in text
    assert text.index("## A") < text.index("## B")  # a section keeps its place
    assert text.count("<!-- begin a -->") == 1 and text.count("<!-- end b -->") == 1
    p.write_text(text.replace("<!-- end a -->\n", "<!-- end a -->\n\nprose after a\n"))
    metrics.update_results(p, "a", "## A\nthird")
    assert "<!-- end a -->\n\nprose after a\n" in p.read_text()  # hand-written prose stays its own paragraph


# ----------------------------------------------------------------------------- held-out measurement

def test_cached_classifier_is_trained_once_and_then_loaded(tmp_path, monkeypatch, tiny_classifier, heldout):
    calls = []
    monkeypatch.setattr(metrics, "train_classifier", lambda size, steps: calls.append((size, steps)) or tiny_classifier)
    folder = tmp_path / "new" / "folder"  # made if missing
    first = metrics.cached_classifier(str(folder), 7)
    second = metrics.cached_classifier(str(folder), 7)
    assert calls == [(32, 7)] and sorted(p.name for p in folder.iterdir()) == ["classifier32-7.safetensors"]
    (images, _), _ = heldout
    for m in (first, second):
        assert torch.equal(metrics.extract_features(m, images[:8]),
                           metrics.extract_features(tiny_classifier, images[:8]))


def test_held_out_is_the_validation_and_test_streams_encoded():
    from helpers import random_bundle
    b = random_bundle(0)
    data = metrics.held_out(b, 32, n_eval=5, n_val=3)
    test, captions = synth.images(synth.TEST_SEED, 0, 5, 32)
    val, val_captions = synth.images(synth.VAL_SEED, 0, 3, 32)
    assert torch.equal(data["test"], test)
    with torch.no_grad():
        assert torch.equal(data["x1"], b.vae.encode(val))
        assert torch.equal(data["val_ctx"], b.encode_prompt(val_captions))
        assert torch.equal(data["test_ctx"], b.encode_prompt(captions))
    for i, c in enumerate(captions):
        assert {n: int(v[i]) for n, v in data["labels"].items()} == synth.parse_caption(c).labels()


def test_image_scores_are_fd_to_the_test_images_and_mean_accuracy(tiny_classifier, heldout):
    (val, _), (test, labels) = heldout
    data = {"test": test, "labels": labels}
    s = metrics.image_scores(tiny_classifier, val, data)
    acc = attribute_accuracy(tiny_classifier, val, labels)
    assert s == {"fd": fd_score(tiny_classifier, val, test), "acc": acc["mean"],
                 **{f"acc_{k}": acc[k] for k in ("shape", "color", "size", "position", "background")}}
    assert metrics.image_scores(tiny_classifier, test, data)["fd"] == pytest.approx(0, abs=1e-4)  # sqrtm rounding
