"""Built-in data sets against their generating process, step-indexed batching, npz loading."""

import jax
import numpy as np
import pytest

from jaxnv.config import DataConfig
from jaxnv.data import (
    HOUSE_BIAS,
    HOUSE_WEIGHTS,
    StepBatches,
    eval_batches,
    from_npz,
    house_prices,
    make_dataset,
    teacher_regression,
    two_moons,
)

NOISE = 0.1


def _all(ds, key):
    return np.concatenate([ds.train[key], ds.eval[key]]).astype(np.float64)


def _lstsq_with_se(x, y, sigma):
    """Least squares of `y` on `[x, 1]` and each coefficient's standard error for noise `sigma`."""
    a = np.c_[x.astype(np.float64), np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(a, y.astype(np.float64), rcond=None)
    se = sigma * np.sqrt(np.diag(np.linalg.inv(a.T @ a)))
    return coef, se, a


# ---------------------------------------------------------------------------------------------
# house prices


def test_house_prices_shapes_and_dtypes():
    ds = house_prices(100, 30, NOISE, seed=0)
    assert ds.train["x"].shape == (100, 4) and ds.train["y"].shape == (100, 1)
    assert ds.eval["x"].shape == (30, 4) and ds.eval["y"].shape == (30, 1)
    assert ds.train["x"].dtype == np.float32 and ds.train["y"].dtype == np.float32
    assert (ds.in_features, ds.out_features, ds.task) == (4, 1, "regression")


def test_house_prices_is_deterministic_per_seed():
    a, b, c = (house_prices(200, 50, NOISE, seed=s) for s in (5, 5, 6))
    for split in ("train", "eval"):
        for key in ("x", "y"):
            np.testing.assert_array_equal(getattr(a, split)[key], getattr(b, split)[key])
    assert not np.array_equal(a.train["x"], c.train["x"])
    assert not np.array_equal(a.train["y"], c.train["y"])


def test_house_prices_is_standardized():
    """x is standardized with the population mean/std, y's signal too, plus noise of std NOISE.

    Tolerances are 5 standard errors: the sample mean of a unit-variance column has SE 1/sqrt(n);
    the sample variance has SE sqrt((kurtosis - 1) / n) <= sqrt(2 / n) because every column
    (uniform, discrete uniform, their linear mix plus Gaussian noise) has kurtosis <= 3.
    """
    ds = house_prices(20_000, 1_000, NOISE, seed=1)
    x, y = _all(ds, "x"), _all(ds, "y")[:, 0]
    n = len(x)
    mean_tol, var_tol = 5 / np.sqrt(n), 5 * np.sqrt(2 / n)
    np.testing.assert_array_less(np.abs(x.mean(0)), mean_tol)
    np.testing.assert_array_less(np.abs(x.var(0) - 1), var_tol)
    assert abs(y.mean()) < mean_tol * np.sqrt(1 + NOISE**2)
    assert abs(y.var() / (1 + NOISE**2) - 1) < var_tol  # var(signal) = 1, var(noise) = NOISE**2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_house_prices_lstsq_recovers_generating_weights(seed):
    """np.linalg.lstsq on the train split gives info["weights"] (and bias 0) within 5 SE.

    SE_j = NOISE * sqrt([(A^T A)^-1]_jj) with A = [x, 1]: y has Gaussian noise of std NOISE in
    standardized units, so this is the exact sampling std of the least-squares coefficient. The
    residual std estimates NOISE itself (SE of a sample std: sigma / sqrt(2 (n - p))).
    """
    ds = house_prices(1000, 200, NOISE, seed=seed)
    y = ds.train["y"][:, 0]
    coef, se, a = _lstsq_with_se(ds.train["x"], y, NOISE)
    truth = np.r_[ds.info["weights"], ds.info["bias"]]
    np.testing.assert_array_less(np.abs(coef - truth), 5 * se)
    dof = len(y) - a.shape[1]
    resid_std = np.sqrt(np.sum((y - a @ coef) ** 2) / dof)
    assert abs(resid_std - NOISE) < 5 * NOISE / np.sqrt(2 * dof)


def test_house_prices_raw_units():
    """Undoing the standardization gives raw features and prices from the documented process.

    Population stats by hand: area U(40, 250), rooms uniform on 1..6, age U(0, 80), distance
    U(0, 30); price = 50 + 1.5 area + 10 rooms - 0.8 age - 3 distance (k$) + noise.
    """
    ds = house_prices(5000, 500, NOISE, seed=2)
    info = ds.info
    mean = np.array([145.0, 3.5, 40.0, 15.0])
    std = np.array([210 / np.sqrt(12), np.sqrt(35 / 12), 80 / np.sqrt(12), 30 / np.sqrt(12)])
    np.testing.assert_allclose(info["feature_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(info["feature_std"], std, rtol=1e-12)
    weights = np.array([1.5, 10.0, -0.8, -3.0])
    np.testing.assert_array_equal(HOUSE_WEIGHTS, weights)
    assert HOUSE_BIAS == 50.0
    np.testing.assert_allclose(info["price_mean"], 50 + weights @ mean, rtol=1e-12)
    np.testing.assert_allclose(info["price_std"], np.sqrt(np.sum((weights * std) ** 2)), rtol=1e-12)
    # Standardized weights convert back to k$ per unit.
    np.testing.assert_allclose(
        np.asarray(info["weights"]) * info["price_std"] / info["feature_std"], weights, rtol=1e-12
    )

    raw = _all(ds, "x") * info["feature_std"] + info["feature_mean"]
    low, high = np.array([40.0, 1.0, 0.0, 0.0]), np.array([250.0, 6.0, 80.0, 30.0])
    assert np.all(raw >= low - 1e-3) and np.all(raw <= high + 1e-3)
    rooms = raw[:, 1]
    np.testing.assert_allclose(rooms, np.round(rooms), atol=1e-4)  # whole rooms only
    assert set(np.round(rooms).astype(int)) == {1, 2, 3, 4, 5, 6}

    # Least squares in raw units recovers the k$ weights and bias within 5 SE.
    price = _all(ds, "y")[:, 0] * info["price_std"] + info["price_mean"]
    coef, se, _ = _lstsq_with_se(raw, price, NOISE * info["price_std"])
    np.testing.assert_array_less(np.abs(coef - np.r_[weights, 50.0]), 5 * se)


# ---------------------------------------------------------------------------------------------
# the other built-in sets


def test_two_moons_labels_and_determinism():
    a, b = two_moons(400, 100, 0.15, seed=0), two_moons(400, 100, 0.15, seed=0)
    np.testing.assert_array_equal(a.train["x"], b.train["x"])
    y = _all(a, "y")
    assert y.shape == (500, 1) and set(np.unique(y)) == {0.0, 1.0}
    # Labels are fair coin flips: the share of 1s is within 5 SE (0.5 / sqrt(n)) of 1/2.
    assert abs(y.mean() - 0.5) < 5 * 0.5 / np.sqrt(len(y))
    assert (a.in_features, a.out_features, a.task) == (2, 1, "binary")
    # The two classes are separated: their means differ by more than the within-class spread / 2.
    x = _all(a, "x")
    gap = np.linalg.norm(x[y[:, 0] == 0].mean(0) - x[y[:, 0] == 1].mean(0))
    assert gap > 0.5 * x.std()


def test_teacher_regression_target_variance():
    """The teacher's signal is standardized over all n samples, then noise is added.

    So var(y) = 1 + noise**2 up to the noise's sampling error (5 SE with SE <= sqrt(2/n) * noise**2
    plus the signal-noise cross term, whose SE is 2 * noise / sqrt(n)).
    """
    noise = 0.1
    ds = teacher_regression(4000, 1000, noise, seed=0)
    y = _all(ds, "y")[:, 0]
    n = len(y)
    assert abs(y.var() - (1 + noise**2)) < 5 * (np.sqrt(2 / n) * noise**2 + 2 * noise / np.sqrt(n))
    assert ds.train["x"].shape == (4000, 10) and ds.eval["y"].shape == (1000, 1)
    x = _all(ds, "x")
    np.testing.assert_array_less(np.abs(x.mean(0)), 5 / np.sqrt(n))


def test_make_dataset_dispatches_by_name():
    cfg = DataConfig(name="house_prices", num_train=50, num_eval=10, noise=0.2, seed=3)
    got, want = make_dataset(cfg), house_prices(50, 10, 0.2, 3)
    np.testing.assert_array_equal(got.train["x"], want.train["x"])
    np.testing.assert_array_equal(got.eval["y"], want.eval["y"])
    assert make_dataset(DataConfig(name="classification", num_train=8, num_eval=4)).task == "binary"
    assert make_dataset(DataConfig(name="regression", num_train=8, num_eval=4)).in_features == 10


def test_make_dataset_unknown_name_did_you_mean():
    with pytest.raises(ValueError) as err:
        make_dataset(DataConfig(name="house_price"))
    msg = str(err.value)
    assert "did you mean 'house_prices'?" in msg and "\n" not in msg
    for name in ("house_prices", "classification", "regression", "npz"):
        assert name in msg  # the valid names are listed


def test_make_dataset_refuses_empty_splits():
    with pytest.raises(ValueError, match="num_train"):
        make_dataset(DataConfig(num_train=0))
    with pytest.raises(ValueError, match="num_eval"):
        make_dataset(DataConfig(num_eval=0))


# ---------------------------------------------------------------------------------------------
# npz


def _write_npz(path, y_dtype=np.float32, drop=()):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(12, 3, 2)).astype(np.float32),
        "x_eval": rng.normal(size=(5, 3, 2)).astype(np.float32),
    }
    if np.issubdtype(y_dtype, np.integer):
        arrays["y_train"] = rng.integers(0, 4, size=12).astype(y_dtype)
        arrays["y_eval"] = rng.integers(0, 4, size=5).astype(y_dtype)
    else:
        arrays["y_train"] = rng.normal(size=(12, 2)).astype(y_dtype)
        arrays["y_eval"] = rng.normal(size=(5, 2)).astype(y_dtype)
    np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})
    return arrays


def test_from_npz_loads_regression_arrays(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _write_npz(path)
    ds = from_npz(str(path))
    np.testing.assert_array_equal(ds.train["x"], arrays["x_train"])
    np.testing.assert_array_equal(ds.train["y"], arrays["y_train"])
    np.testing.assert_array_equal(ds.eval["x"], arrays["x_eval"])
    np.testing.assert_array_equal(ds.eval["y"], arrays["y_eval"])
    assert (ds.in_features, ds.out_features, ds.task) == (6, 2, "regression")
    # ... and through the config.
    via_cfg = make_dataset(DataConfig(name="npz", path=str(path)))
    np.testing.assert_array_equal(via_cfg.eval["x"], arrays["x_eval"])


def test_from_npz_integer_labels_are_multiclass(tmp_path):
    path = tmp_path / "c.npz"
    arrays = _write_npz(path, y_dtype=np.int32)
    ds = from_npz(str(path))
    assert ds.task == "multiclass"
    assert ds.out_features == int(arrays["y_train"].max()) + 1


def test_from_npz_missing_key_is_clear(tmp_path):
    path = tmp_path / "partial.npz"
    _write_npz(path, drop=("y_eval",))
    with pytest.raises(ValueError) as err:
        from_npz(str(path))
    msg = str(err.value)
    assert "y_eval" in msg and "x_train" not in msg  # names exactly what is missing
    assert str(path) in msg


def test_from_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        from_npz(str(tmp_path / "nope.npz"))


# ---------------------------------------------------------------------------------------------
# batching


def _indexed(n):
    """Arrays whose rows name their index, with y tied to x so misaligned rows show."""
    return {"x": np.arange(n), "y": 10 * np.arange(n)}


def test_step_batches_is_a_pure_function_of_data_seed_and_step():
    data = _indexed(50)
    a, b, other = (
        StepBatches(data, 8, seed=3),
        StepBatches(data, 8, seed=3),
        StepBatches(data, 8, 4),
    )
    steps = [0, 17, 3, 40, 3, 6]  # random access, out of order, repeated, beyond the first epoch
    for s in steps:
        np.testing.assert_array_equal(a[s]["x"], b[s]["x"])
    np.testing.assert_array_equal(a[3]["x"], a[3]["x"])
    assert any(not np.array_equal(a[s]["x"], other[s]["x"]) for s in range(6))
    # `iterate` yields the same batches as indexing.
    for s, batch in zip(range(5, 9), a.iterate(5, 9), strict=True):
        np.testing.assert_array_equal(batch["x"], a[s]["x"])


def test_step_batches_rows_stay_aligned_and_sized():
    batches = StepBatches(_indexed(30), 7, seed=0)
    for s in range(10):
        batch = batches[s]
        assert batch["x"].shape == (7,)
        np.testing.assert_array_equal(batch["y"], 10 * batch["x"])


def test_each_epoch_is_a_shuffled_permutation():
    n, batch = 60, 10
    batches = StepBatches(_indexed(n), batch, seed=0)
    per_epoch = n // batch
    epochs = [
        np.concatenate([batches[e * per_epoch + s]["x"] for s in range(per_epoch)])
        for e in range(3)
    ]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))  # every example exactly once
        assert not np.array_equal(order, np.arange(n))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(epochs[1], epochs[2])


def test_batches_straddle_epochs_when_batch_does_not_divide():
    n, batch = 10, 4
    batches = StepBatches(_indexed(n), batch, seed=1)
    stream = np.concatenate([batches[s]["x"] for s in range(5)])  # 20 examples = 2 epochs
    np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(stream[n:]), np.arange(n))


def _reference_indices(n, batch, seed, step):
    """The order `StepBatches` has always used: positions in an endless stream of epochs, each
    epoch a `default_rng([seed, epoch])` permutation (checkpoints of old runs resume on it)."""
    epochs, offsets = np.divmod(np.arange(step * batch, (step + 1) * batch), n)
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    return np.array([perms[e][o] for e, o in zip(epochs, offsets, strict=True)])


@pytest.mark.parametrize(("n", "batch"), [(50, 8), (10, 4), (7, 7), (3, 8)])
def test_batch_order_matches_the_reference(n, batch):
    batches = StepBatches(_indexed(n), batch, seed=11)
    for step in (0, 1, 5, 6, 13, 40, 2):
        want = _reference_indices(n, batch, 11, step)
        np.testing.assert_array_equal(batches.indices(step), want)
        np.testing.assert_array_equal(batches[step]["x"], want)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("placement", ["none", "numpy", "device"])
def test_chunked_iteration_yields_each_steps_batch(processes, prefetch, placement):
    """`iterate` prepares several steps at a time; every batch is still `local(step)`."""
    data = {"x": np.arange(23), "y": 10 * np.arange(23), "z": np.arange(46.0).reshape(23, 2)}
    for start, stop in [(0, 1), (0, 10), (3, 17), (16, 33), (5, 6)]:
        for index in range(processes):
            batches = StepBatches(data, 6, seed=2, process_index=index, process_count=processes)
            batches.chunk_steps = 4  # chunks end at 4, 8, ... steps after `start`
            calls = []

            def put(tree, calls=calls):
                calls.append(1)
                if placement == "device":
                    return jax.device_put(tree)
                return jax.tree.map(lambda v: v + 0, tree)

            got = list(
                batches.iterate(
                    start, stop, prefetch=prefetch, put=None if placement == "none" else put
                )
            )
            assert len(got) == stop - start
            if placement != "none":
                assert len(calls) == -(-(stop - start) // 4)  # once a chunk
            for step, b in enumerate(got, start):
                want = batches.local(step)
                assert set(b) == set(want)
                for key in want:
                    assert b[key].shape == want[key].shape
                    np.testing.assert_array_equal(np.asarray(b[key]), want[key])
                    if placement == "device":
                        assert isinstance(b[key], jax.Array)


def test_batches_split_on_the_device_keep_the_batch_sharding():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    data = {"x": np.arange(200.0).reshape(100, 2), "y": np.arange(100)}
    batches = StepBatches(data, 16, seed=0)
    got = list(batches.iterate(0, 40, put=lambda t: jax.device_put(t, sharding)))
    for step, b in enumerate(got):
        for key, want in batches.local(step).items():
            assert b[key].sharding == sharding
            np.testing.assert_array_equal(np.asarray(b[key]), want)


def test_big_batches_are_prepared_one_step_at_a_time():
    batches = StepBatches({"x": np.zeros((64, 1024), np.float32)}, 32, seed=0)  # 128 KiB each
    assert batches._steps_per_chunk() == 8  # 1 MiB a chunk
    batches.chunk_bytes = 1
    assert batches._steps_per_chunk() == 1


def test_concurrent_readers_share_the_epoch_cache():
    from concurrent.futures import ThreadPoolExecutor

    batches = StepBatches(_indexed(5), 4, seed=0)  # a new epoch every other step
    steps = list(range(200)) * 2
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: batches.local(s)["x"], steps))
    for step, x in zip(steps, got, strict=True):
        np.testing.assert_array_equal(x, _reference_indices(5, 4, 0, step))


def test_step_batches_refuses_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        StepBatches({"x": np.zeros(10), "y": np.zeros(9)}, 2, seed=0)


@pytest.mark.parametrize(("n", "batch"), [(10, 4), (8, 4), (3, 256)])
def test_eval_batches_cover_every_example_once_in_order(n, batch):
    data = _indexed(n)
    out = list(eval_batches(data, batch))
    sizes = [count for _, count in out]
    expected = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    assert sizes == expected  # the last batch is partial, never dropped or padded
    for b, count in out:
        assert len(b["x"]) == len(b["y"]) == count
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in out]), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([b["y"] for b, _ in out]), 10 * np.arange(n))
