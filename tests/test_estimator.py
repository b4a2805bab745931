"""End-to-end tests of the GACC estimator on tiny networks and a small volume."""

import logging

import numpy as np
import pytest
import torch
from sklearn.base import clone

import gacc
from engine_fixtures import (
    N_FEATURES,
    SPATIAL_SHAPE,
    TINY_PARAMS,
    dice,
    hide_labels,
    make_volume,
    network_weights,
    same_weights,
    torch_single_thread,  # noqa: F401
)
from gacc.callbacks import LambdaCallback

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = TINY_PARAMS["num_clusters"]


def _model(**params):
    return gacc.GACC(**{**TINY_PARAMS, **params})


def _fit(data, clusters, steps=6, params=None, **fit_kwargs):
    return _model(**(params or {})).fit(data, clusters, num_batches=steps, epochs=1,
                                        **fit_kwargs)


def _record_initial_weights(store):
    """Return a callback that copies all weights before the first step into ``store``."""
    def on_train_begin(model):
        store.update(network_weights(model.networks_))
    return LambdaCallback(on_train_begin=on_train_begin)


def _part(weights, prefix):
    return {name: value for name, value in weights.items() if name.startswith(prefix + ".")}


@pytest.fixture(scope="module")
def volume():
    return make_volume()


@pytest.fixture(scope="module")
def fitted(volume):
    data, clusters = volume
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _fit(data, clusters, steps=12)
    finally:
        torch.set_num_threads(previous)
    return model


# ----------------------------------------------------------------------
# Shapes and masks


def test_fit_returns_self(volume):
    data, clusters = volume
    model = _model()
    assert model.fit(data, clusters, num_batches=2, epochs=1) is model


def test_fitted_attributes(fitted):
    assert fitted.n_steps_ == 12
    assert fitted.n_features_in_ == N_FEATURES
    assert fitted.n_known_clusters_ == 3
    assert fitted.spatial_shape_ == SPATIAL_SHAPE
    assert fitted.device_ == torch.device("cpu")
    for name, values in fitted.history_.items():
        assert len(values) == 12, name


def test_predict_shape_and_range(fitted, volume):
    data, _ = volume
    proba = fitted.predict(data)
    assert proba.dtype == np.float32
    assert proba.shape == SPATIAL_SHAPE + (K,)
    assert np.all(np.isfinite(proba))
    assert proba.min() >= 0.0
    assert proba.max() <= 1.0


def test_predict_zero_outside_mask(volume):
    data, clusters = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[2:8, 1:6, 3:7] = True
    model = _fit(data, clusters, mask=mask)
    proba = model.predict(data, mask=mask)
    assert np.all(proba[~mask] == 0.0)
    assert np.all(proba[mask] > 0.0)


def test_predict_ignores_data_outside_mask(fitted, volume):
    data, _ = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[:5, 3:, :6] = True
    changed = data.copy()
    changed[~mask] = np.random.default_rng(4).normal(size=changed[~mask].shape) * 50
    assert np.array_equal(fitted.predict(data, mask=mask), fitted.predict(changed, mask=mask))


def test_predict_reuses_fit_scaling(fitted, volume):
    # Scaling learned anew in predict would map a shifted copy of the data
    # onto the same tokens and the same memberships.
    data, _ = volume
    shifted = data + 2.0
    assert not np.allclose(fitted.predict(shifted), fitted.predict(data), atol=1e-3)
    np.testing.assert_allclose(fitted.scaling_.data_min_, data.reshape(-1, N_FEATURES).min(0))
    np.testing.assert_allclose(fitted.scaling_.data_max_, data.reshape(-1, N_FEATURES).max(0))


def test_warm_start_keeps_scaling(volume):
    data, clusters = volume
    model = _fit(data, clusters, steps=2)
    data_min = model.scaling_.data_min_.copy()
    model.fit(data * 3.0, clusters, num_batches=1, epochs=1, warm_start=True)
    np.testing.assert_array_equal(model.scaling_.data_min_, data_min)


def _spy_batches(monkeypatch):
    batches = []
    original = gacc.GACC._sample_batch

    def sample_batch(self, tensors):
        batch = original(self, tensors)
        batches.append(batch)
        return batch

    monkeypatch.setattr(gacc.GACC, "_sample_batch", sample_batch)
    return batches


def _assert_batches_inside(batches, mask, model):
    """Check that every voxel of every batch lies inside ``mask``, by its position."""
    inside_positions = gacc.preprocessing.positional_encoding(
        np.flatnonzero(mask), SPATIAL_SHAPE, model.num_frequencies
    )
    allowed = {tuple(row) for row in inside_positions.round(5)}
    for batch in batches:
        rows = batch.position.reshape(-1, batch.position.shape[-1]).numpy().round(5)
        for row in rows:
            assert tuple(row) in allowed


def test_training_samples_inside_mask(volume, monkeypatch):
    # Voxels outside the mask also carry values far beyond the range the
    # scaling learns on the mask, so any of them in a batch shows as a value > 1.
    data, clusters = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[1:7, 2:9, 2:6] = True
    data = data.copy()
    data[~mask] = 1000.0
    batches = _spy_batches(monkeypatch)
    model = _fit(data, clusters, steps=20, mask=mask)
    assert len(batches) == 20
    for batch in batches:
        assert float(batch.data.min()) >= 0.0
        assert float(batch.data.max()) <= 1.0 + 1e-6
    _assert_batches_inside(batches, mask, model)


def test_default_mask_skips_zero_voxels(volume, monkeypatch):
    data, clusters = volume
    data = data.copy()
    background = np.zeros(SPATIAL_SHAPE, dtype=bool)
    background[:3] = True
    data[background] = 0.0
    batches = _spy_batches(monkeypatch)
    model = _fit(data, clusters, steps=15)
    proba = model.predict(data)
    assert np.all(proba[background] == 0.0)
    assert np.all(proba[~background] > 0.0)
    _assert_batches_inside(batches, ~background, model)


def test_local_sampling_fit_and_predict(volume, monkeypatch):
    data, clusters = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[1:8, 2:9, 1:7] = True
    batches = _spy_batches(monkeypatch)
    params = {"set_sampling": "local", "window_size": 3}
    model = _fit(data, clusters, steps=10, params=params, mask=mask)
    _assert_batches_inside(batches, mask, model)

    proba = model.predict(data, mask=mask)
    assert proba.shape == SPATIAL_SHAPE + (K,)
    assert np.all(proba[~mask] == 0.0)
    assert np.all(proba[mask] > 0.0)
    assert proba.max() <= 1.0
    assert np.array_equal(model.predict(data, mask=mask), proba)
    again = _fit(data, clusters, steps=10, params=params, mask=mask)
    assert again.history_ == model.history_


def test_local_sampling_changes_training(volume):
    data, clusters = volume
    local = _fit(data, clusters, params={"set_sampling": "local", "window_size": 3})
    plain = _fit(data, clusters, params={"set_sampling": "global"})
    assert local.history_["supervised"] != plain.history_["supervised"]


def test_known_entries_outside_mask(volume):
    data, clusters = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[:4] = True
    partial = clusters.copy()
    partial[:4] = np.nan
    with pytest.raises(gacc.InvalidInputError, match="No known cluster entry lies inside"):
        _fit(data, partial, mask=mask)


def test_failed_fit_keeps_model(fitted, volume):
    # A fit call rejected for its input leaves a fitted model as it was.
    data, clusters = volume
    before = fitted.predict(data)
    weights = network_weights(fitted.networks_)
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[:4] = True
    partial = clusters.copy()
    partial[:4] = np.nan
    with pytest.raises(gacc.InvalidInputError):
        fitted.fit(data, partial, mask=mask, num_batches=2, epochs=1)
    assert fitted.n_steps_ == 12
    assert same_weights(weights, network_weights(fitted.networks_))
    assert np.array_equal(fitted.predict(data), before)


# ----------------------------------------------------------------------
# Input types and edge cases


def test_input_dtypes_agree(fitted, volume):
    data, clusters = volume
    reference = _fit(data, clusters)
    as_float64 = _fit(data.astype(np.float64), clusters.astype(np.float64))
    as_tensor = _fit(torch.from_numpy(data), torch.from_numpy(clusters))
    as_bool = _fit(data, clusters.astype(bool))
    expected = reference.predict(data)
    for model in (as_float64, as_tensor, as_bool):
        assert model.history_ == reference.history_
        assert np.array_equal(model.predict(data.astype(np.float64)), expected)


def test_nan_and_known_mask_agree(volume):
    # Marking entries unknown with NaN or with known_mask trains identically,
    # whatever values the masked entries hold.
    data, clusters = volume
    unknown = np.random.default_rng(2).random(clusters.shape) < 0.4
    with_nan = clusters.copy()
    with_nan[unknown] = np.nan
    flipped = np.where(unknown, 1.0 - clusters, clusters)
    first = _fit(data, with_nan)
    second = _fit(data, flipped, known_mask=~unknown)
    assert first.history_ == second.history_
    assert np.array_equal(first.predict(data), second.predict(data))


@pytest.mark.parametrize(
    "shape, n_clusters, params, mask_voxels",
    [
        pytest.param((9, 10, 8), 3, {"num_clusters": 3}, None, id="K-equals-P"),
        pytest.param((9, 10, 8), 1, {}, None, id="P-is-1"),
        pytest.param((9, 10, 8), 1, {"num_clusters": 40}, None, id="K-much-larger"),
        pytest.param((2, 3, 2), 2, {}, None, id="12-voxels"),
        pytest.param((1, 1, 8), 2, {}, None, id="one-set"),
        pytest.param((4, 3, 1), 2, {"set_size": 3, "batch_size": 1}, None, id="flat-volume"),
        pytest.param((9, 10, 8), 2, {}, 8, id="mask-of-set-size"),
        pytest.param((9, 10, 8), 2, {}, 13, id="mask-under-two-sets"),
    ],
)
def test_edge_cases_fit_and_predict(shape, n_clusters, params, mask_voxels):
    data, clusters = make_volume(shape, n_clusters=n_clusters, inside_probability=0.5)
    mask = None
    if mask_voxels is not None:
        mask = np.zeros(shape, dtype=bool)
        mask.reshape(-1)[np.arange(0, 7 * mask_voxels, 7)] = True
    model = _fit(data, clusters, steps=3, params=params, mask=mask)
    proba = model.predict(data, mask=mask)
    assert proba.shape == shape + (model.num_clusters,)
    assert np.all(np.isfinite(proba))
    assert proba.min() >= 0.0
    assert proba.max() <= 1.0
    if mask is not None:
        assert np.all(proba[~mask] == 0.0)


def test_mask_smaller_than_set(volume):
    data, clusters = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[0, 0, :5] = True
    with pytest.raises(gacc.InvalidInputError, match="5 voxels, fewer than set_size=8"):
        _fit(data, clusters, mask=mask)


def test_sklearn_clone(fitted):
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not hasattr(copy, "networks_")
    assert "num_clusters=4" in repr(fitted)


# ----------------------------------------------------------------------
# Determinism


def test_same_seed_same_fit(volume):
    data, clusters = volume
    first = _fit(data, clusters, steps=8)
    second = _fit(data, clusters, steps=8)
    assert first.history_ == second.history_
    assert np.array_equal(first.predict(data), second.predict(data))


def test_other_seed_other_fit(volume):
    data, clusters = volume
    first = _fit(data, clusters, steps=8)
    second = _fit(data, clusters, steps=8, params={"random_state": 1})
    assert first.history_["supervised"] != second.history_["supervised"]
    assert not np.array_equal(first.predict(data), second.predict(data))


def test_predict_repeats_exactly(volume):
    data, clusters = volume
    model = _fit(data, clusters, params={"random_state": None})
    assert np.array_equal(model.predict(data), model.predict(data))


def test_predict_in_chunks(fitted, volume):
    # Sets split over several forward passes give the same memberships.
    data, _ = volume
    whole = fitted.predict(data)
    chunked = clone(fitted).set_params(prediction_batch_size=3)
    for name in ("networks_", "scaling_", "spatial_shape_", "n_features_in_", "device_"):
        setattr(chunked, name, getattr(fitted, name))
    np.testing.assert_allclose(chunked.predict(data), whole, atol=1e-6)


def test_refit_starts_afresh(volume):
    data, clusters = volume
    model = _fit(data, clusters, steps=8)
    model.fit(data, clusters, num_batches=8, epochs=1)
    fresh = _fit(data, clusters, steps=8)
    assert model.n_steps_ == 8
    assert model.history_ == fresh.history_
    assert np.array_equal(model.predict(data), fresh.predict(data))


def test_warm_start_equals_one_fit(volume):
    # Continuing for 4 steps after 6 gives exactly a 10-step fit: weights,
    # optimizer state and random streams all carry over.
    data, clusters = volume
    whole = _fit(data, clusters, steps=10)
    split = _fit(data, clusters, steps=6)
    split.fit(data, clusters, num_batches=4, epochs=1, warm_start=True)
    assert split.n_steps_ == 10
    assert split.history_ == whole.history_
    assert np.array_equal(split.predict(data), whole.predict(data))


def test_warm_start_keeps_optimizer_state(volume):
    data, clusters = volume
    model = _fit(data, clusters, steps=5)
    model.fit(data, clusters, num_batches=3, epochs=1, warm_start=True)
    for name, optimizer in model._trainer.optimizers.items():
        steps = {float(state["step"]) for state in optimizer.state_dict()["state"].values()}
        assert steps == {8.0}, name


def test_warm_start_other_clusters(fitted, volume):
    data, clusters = volume
    with pytest.raises(gacc.InvalidInputError, match="P=2 clusters but the model was fitted"):
        fitted.fit(data, clusters[..., :2], num_batches=1, epochs=1, warm_start=True)


def test_warm_start_other_shape(fitted, volume):
    data, clusters = volume
    with pytest.raises(gacc.InvalidInputError, match="was fitted on"):
        fitted.fit(data[:8], clusters[:8], num_batches=1, epochs=1, warm_start=True)


def test_warm_start_unfitted_fits(volume):
    data, clusters = volume
    model = _model().fit(data, clusters, num_batches=6, epochs=1, warm_start=True)
    assert model.history_ == _fit(data, clusters, steps=6).history_


# ----------------------------------------------------------------------
# Loss terms


def test_losses_logged_finite_nonnegative(fitted):
    expected = {"supervised", "adversarial", "xc", "cx", "generator", "discriminator",
                "xc_predictor", "cx_predictor"}
    assert set(fitted.history_) == expected
    for name, values in fitted.history_.items():
        values = np.asarray(values)
        assert np.all(np.isfinite(values)), name
        assert values.min() >= 0.0, name


@pytest.mark.parametrize(
    "term, network",
    [("adversarial", "discriminator"), ("xc", "xc_predictor"), ("cx", "cx_predictor")],
)
def test_loss_term_off(volume, term, network):
    data, clusters = volume
    initial = {}
    off = _fit(data, clusters, params={f"{term}_weight": 0.0},
               callbacks=[_record_initial_weights(initial)])
    on = _fit(data, clusters)

    assert term not in off.history_
    assert network not in off.history_
    assert term in on.history_
    assert network in on.history_

    # The network behind the term is never trained ...
    final = network_weights(off.networks_)
    assert same_weights(_part(final, network), _part(initial, network))
    # ... while the generator is, and differently from a run with the term on.
    assert not same_weights(_part(final, "generator"), _part(initial, "generator"))
    on_generator = _part(network_weights(on.networks_), "generator")
    assert not same_weights(_part(final, "generator"), on_generator)


def test_supervised_term_off(volume):
    data, clusters = volume
    model = _fit(data, clusters, params={"supervised_weight": 0.0})
    assert "supervised" not in model.history_
    assert {"adversarial", "xc", "cx", "generator"} <= set(model.history_)


def test_only_supervised_term(volume):
    data, clusters = volume
    initial = {}
    params = {"adversarial_weight": 0, "xc_weight": 0, "cx_weight": 0}
    model = _fit(data, clusters, params=params, callbacks=[_record_initial_weights(initial)])
    assert set(model.history_) == {"supervised", "generator"}
    np.testing.assert_allclose(model.history_["generator"], model.history_["supervised"])
    final = network_weights(model.networks_)
    for network in ("discriminator", "xc_predictor", "cx_predictor"):
        assert same_weights(_part(final, network), _part(initial, network)), network


def test_loss_weight_scales_total(volume):
    # The generator's total is the weighted sum of its logged terms.
    data, clusters = volume
    weights = {"supervised_weight": 2.0, "adversarial_weight": 0.3, "xc_weight": 0.7,
               "cx_weight": 1.5}
    model = _fit(data, clusters, params=weights)
    history = {name: np.asarray(values) for name, values in model.history_.items()}
    total = (2.0 * history["supervised"] + 0.3 * history["adversarial"]
             + 0.7 * history["xc"] + 1.5 * history["cx"])
    np.testing.assert_allclose(history["generator"], total, rtol=1e-5)


def test_balanced_class_weight(volume):
    data, clusters = volume
    plain = _fit(data, clusters)
    balanced = _fit(data, clusters, params={"class_weight": "balanced"})
    # Inside voxels are about a quarter of each cluster, so weighting them
    # up raises the first step's supervised loss (same weights, same batch).
    assert balanced.history_["supervised"][0] > plain.history_["supervised"][0]
    assert not np.array_equal(balanced.predict(data), plain.predict(data))
    weight = balanced._trainer.positive_weight.numpy()
    assert weight.shape == (3,)
    assert np.all(weight > 1.0)
    assert np.all(weight <= 50.0)


# ----------------------------------------------------------------------
# Learning


def test_learns_held_out_voxels():
    data, clusters = make_volume(noise=0.5, inside_probability=0.25)
    partial, hidden = hide_labels(clusters, fraction=0.5)
    model = _fit(data, partial, steps=150, params={"learning_rate": 3e-3})
    proba = model.predict(data)

    # Predicting every voxel inside would score 2p / (1 + p), about 0.4 here.
    for cluster in range(3):
        score = dice(proba[..., cluster][hidden] > 0.5, clusters[..., cluster][hidden] > 0.5)
        assert score > 0.7, f"cluster {cluster}: held-out Dice {score:.3f}"

    supervised = np.asarray(model.history_["supervised"])
    assert supervised[-20:].mean() < 0.5 * supervised[:20].mean()


# ----------------------------------------------------------------------
# Numerical failures


@pytest.mark.parametrize(
    "huge", ["learning_rate", "discriminator_learning_rate", "predictor_learning_rate"]
)
def test_huge_learning_rate(volume, huge):
    data, clusters = volume
    model = _model(**{huge: 1e6})
    try:
        model.fit(data, clusters, num_batches=30, epochs=1)
    except gacc.NonFiniteLossError as error:
        assert "at step" in str(error)

    # Whatever happened, the model has finite weights and predicts in [0, 1].
    for name, value in network_weights(model.networks_).items():
        assert torch.isfinite(value).all(), name
    for name, values in model.history_.items():
        assert len(values) == model.n_steps_, name
        assert np.all(np.isfinite(values)), name
    proba = model.predict(data)
    assert np.all(np.isfinite(proba))
    assert proba.min() >= 0.0
    assert proba.max() <= 1.0

    # Training goes on from there with sane learning rates.
    steps = model.n_steps_
    model.set_params(learning_rate=1e-3, discriminator_learning_rate=1e-3,
                     predictor_learning_rate=1e-3)
    model.fit(data, clusters, num_batches=3, epochs=1, warm_start=True)
    assert model.n_steps_ == steps + 3


def test_generator_blow_up_restores_weights(volume):
    # With a huge generator learning rate, step 1 ends with finite but huge
    # weights whose output is NaN at step 2; the model returns to the weights
    # from before step 1 and counts no step.
    data, clusters = volume
    initial = {}
    model = _model(learning_rate=1e6)
    with pytest.raises(gacc.NonFiniteLossError, match="at step 2"):
        model.fit(data, clusters, num_batches=5, epochs=1,
                  callbacks=[_record_initial_weights(initial)])
    assert model.n_steps_ == 0
    assert all(values == [] for values in model.history_.values())
    assert same_weights(network_weights(model.networks_), initial)


@pytest.mark.parametrize("scale", [1e30, 3e38], ids=["1e30", "float32-limit"])
def test_extreme_data_train_finite(volume, scale):
    data, clusters = volume
    extreme = np.where(data > 3.0, scale, -scale).astype(np.float32)
    model = _fit(data=extreme, clusters=clusters, steps=5)
    for name, values in model.history_.items():
        assert np.all(np.isfinite(values)), name
    assert np.all(np.isfinite(model.predict(extreme)))


# ----------------------------------------------------------------------
# Invalid input


def _shifted_clusters(clusters):
    bad = clusters.copy()
    bad[1, 1, 1, 0] = 2.0
    return bad


INVALID_FIT_INPUTS = [
    ("data-3d", lambda d, c: (d[..., 0], c, {}), r"must be 4D .* got 3D"),
    ("data-5d", lambda d, c: (d[..., None], c, {}), r"must be 4D .* got 5D"),
    ("clusters-3d", lambda d, c: (d, c[..., 0], {}), r"got 3D shape \(9, 10, 8\)"),
    ("clusters-5d", lambda d, c: (d, c[..., None], {}), r"got 5D"),
    ("spatial-mismatch", lambda d, c: (d, c[:, :9], {}),
     r"spatial shape \(9, 9, 8\) but data_xyzt has \(9, 10, 8\)"),
    ("too-many-clusters", lambda d, c: (d, np.concatenate([c, c], axis=3), {}),
     r"P=6 clusters, more than num_clusters=4"),
    ("nan-data-in-mask", lambda d, c: (np.where(d > 5, np.nan, d), c,
                                        {"mask": np.ones(SPATIAL_SHAPE, bool)}),
     "NaN or infinite values in .* voxels inside the mask"),
    ("inf-data-in-mask", lambda d, c: (np.where(d > 5, np.inf, d), c,
                                        {"mask": np.ones(SPATIAL_SHAPE, bool)}),
     "NaN or infinite values in .* voxels inside the mask"),
    ("all-nan-data", lambda d, c: (np.full_like(d, np.nan), c, {}), "only NaN or infinite"),
    ("constant-data", lambda d, c: (np.ones_like(d), c, {}), r"constant \(every value is 1.0\)"),
    ("no-known-entry", lambda d, c: (d, np.full_like(c, np.nan), {}), "no known entry"),
    ("clusters-above-one", lambda d, c: (d, _shifted_clusters(c), {}),
     r"from 0.0 to 2.0"),
    ("missing-clusters", lambda d, c: (d, None, {}), "cluster_xyzp is missing"),
    ("known-mask-shape", lambda d, c: (d, c, {"known_mask": np.ones(SPATIAL_SHAPE, bool)}),
     r"known_mask has shape \(9, 10, 8\) but cluster_xyzp has \(9, 10, 8, 3\)"),
    ("empty-mask", lambda d, c: (d, c, {"mask": np.zeros(SPATIAL_SHAPE, bool)}),
     "selects no voxel"),
    ("mask-shape", lambda d, c: (d, c, {"mask": np.ones((9, 10, 7), bool)}),
     r"mask has shape \(9, 10, 7\)"),
    ("mask-swapped-axes", lambda d, c: (d, c, {"mask": np.ones((10, 9, 8), bool)}),
     r"mask has shape \(10, 9, 8\)"),
    ("num-batches-0", lambda d, c: (d, c, {"num_batches": 0}), "num_batches=0"),
    ("epochs-float", lambda d, c: (d, c, {"epochs": 2.0}), "epochs=2.0"),
]


@pytest.mark.parametrize(
    "make_input, message",
    [pytest.param(make, message, id=name) for name, make, message in INVALID_FIT_INPUTS],
)
def test_invalid_fit_input(volume, make_input, message):
    data, clusters = volume
    data, clusters, kwargs = make_input(data, clusters)
    kwargs = {"num_batches": 1, "epochs": 1, **kwargs}
    with pytest.raises(gacc.InvalidInputError, match=message) as raised:
        _model().fit(data, clusters, **kwargs)
    assert isinstance(raised.value, ValueError)


INVALID_PARAMS = [
    ({"num_clusters": 0}, "num_clusters=0"),
    ({"num_clusters": 2.5}, "num_clusters=2.5"),
    ({"num_clusters": True}, "num_clusters=True"),
    ({"set_size": 1}, "set_size=1 must be >= 2"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"num_layers": -1}, "num_layers=-1"),
    ({"adversarial_weight": -0.1}, r"adversarial_weight=-0.1 must be a finite number >= 0"),
    ({"supervised_weight": -1}, "supervised_weight=-1"),
    ({"cx_weight": float("nan")}, "cx_weight=nan"),
    ({"supervised_weight": 0, "adversarial_weight": 0, "xc_weight": 0, "cx_weight": 0},
     "All loss weights are 0"),
    ({"hidden_size": 10, "num_heads": 4}, "hidden_size=10 must be a multiple of num_heads=4"),
    ({"column_hidden_size": 6, "num_heads": 4},
     "column_hidden_size=6 must be a multiple of num_heads=4"),
    ({"class_weight": "bad"}, r"class_weight='bad' is not supported; use None or 'balanced'"),
    ({"set_sampling": "cube"}, r"set_sampling='cube' is not supported; use 'global' or 'local'"),
    ({"window_size": 0}, "window_size=0"),
    ({"hide_probability": 1}, "hide_probability=1 must lie strictly between 0 and 1"),
    ({"hide_probability": 0.0}, "hide_probability=0.0"),
    ({"hide_probability": "half"}, "hide_probability='half'"),
    ({"learning_rate": 0}, "learning_rate=0 must be a finite number > 0"),
    ({"predictor_learning_rate": float("inf")}, "predictor_learning_rate=inf"),
    ({"min_max_scale_range": (1.0, 1.0)}, "min_max_scale_range"),
    ({"min_max_scale_range": "ab"}, "min_max_scale_range"),
    ({"random_state": -1}, "random_state=-1"),
    ({"random_state": 2**32}, "random_state=4294967296"),
    ({"random_state": 1.5}, "random_state=1.5"),
]


@pytest.mark.parametrize(
    "params, message",
    [pytest.param(params, message, id="-".join(f"{k}={v}" for k, v in params.items()))
     for params, message in INVALID_PARAMS],
)
def test_invalid_params(volume, params, message):
    data, clusters = volume
    with pytest.raises(gacc.InvalidInputError, match=message):
        _model(**params).fit(data, clusters, num_batches=1, epochs=1)


def test_numpy_scalar_params(volume):
    data, clusters = volume
    params = {"learning_rate": np.float32(1e-3), "xc_weight": np.float64(0.2),
              "num_clusters": np.int64(4), "random_state": np.int32(0)}
    model = _fit(data, clusters, steps=2, params=params)
    assert model.n_steps_ == 2


def test_invalid_device(volume):
    data, clusters = volume
    with pytest.raises(ValueError, match="device='gpu'"):
        _model(device="gpu").fit(data, clusters, num_batches=1, epochs=1)


def test_predict_before_fit(volume):
    data, _ = volume
    with pytest.raises(gacc.NotFittedError):
        _model().predict(data)


@pytest.mark.parametrize(
    "make_data, message",
    [
        pytest.param(lambda d: d[..., :5], r"\(9, 10, 8, 5\) but the model was fitted on "
                     r"\(9, 10, 8, 12\)", id="other-T"),
        pytest.param(lambda d: d[:, :, :7], r"\(9, 10, 7, 12\)", id="other-grid"),
        pytest.param(lambda d: d[..., 0], "must be 4D", id="3d"),
    ],
)
def test_invalid_predict_input(fitted, volume, make_data, message):
    data, _ = volume
    with pytest.raises(gacc.InvalidInputError, match=message):
        fitted.predict(make_data(data))


def test_predict_nan_inside_mask(fitted, volume):
    data, _ = volume
    with pytest.raises(gacc.InvalidInputError, match="inside the mask"):
        fitted.predict(np.where(data > 5, np.nan, data), mask=np.ones(SPATIAL_SHAPE, bool))


def test_predict_mask_smaller_than_set(fitted, volume):
    data, _ = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[0, 0, :3] = True
    with pytest.raises(gacc.InvalidInputError, match="3 voxels, fewer than set_size=8"):
        fitted.predict(data, mask=mask)


def test_unannotated_cluster_warns(volume, caplog):
    data, clusters = volume
    clusters = clusters.copy()
    clusters[..., 1] = 0.0
    with caplog.at_level(logging.WARNING, logger="gacc"):
        _fit(data, clusters, steps=1)
    assert "Clusters [2] have no known inside voxel" in caplog.text


# ----------------------------------------------------------------------
# Compiled mode


@pytest.mark.slow
def test_compiled_fit(volume, caplog):
    # torch.compile either compiles the networks or falls back to eager mode
    # with a logged warning; either way training and prediction work.
    data, clusters = volume
    model = _model(run_eagerly=False)
    with caplog.at_level(logging.WARNING, logger="gacc"):
        model.fit(data, clusters, num_batches=3, epochs=1)
    assert model._trainer.compiled or "eager" in caplog.text
    assert model.n_steps_ == 3
    for name, values in model.history_.items():
        assert np.all(np.isfinite(values)), name
    proba = model.predict(data)
    assert proba.shape == SPATIAL_SHAPE + (K,)
    assert np.all(np.isfinite(proba))
