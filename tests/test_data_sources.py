"""Digits, text, adding-problem sources; per-process slices; prefetched iteration; npz safety."""

import numpy as np
import pytest

from jaxnv.config import DataConfig
from jaxnv.data import (
    StepBatches,
    adding_problem,
    char_text,
    digits,
    from_npz,
    make_dataset,
    text_corpus,
)


def test_digits_fixed_split_and_range():
    a, b = digits(), digits()
    assert a.train["x"].shape == (1437, 8, 8, 1) and a.eval["x"].shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(a.eval["y"], b.eval["y"])  # the split is fixed
    assert a.train["x"].min() >= 0 and a.train["x"].max() <= 1
    assert a.train["y"].dtype == np.int32 and set(np.unique(a.eval["y"])) == set(range(10))


def test_char_text_windows_are_shifted_and_decode_to_the_corpus():
    ds = char_text(64)
    vocab = ds.info["vocab"]
    x, y = ds.train["x"], ds.train["y"]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    text = text_corpus()
    assert "".join(vocab[i] for i in x[3]) == text[3 * 32 : 3 * 32 + 64]  # stride seq_len // 2
    assert ds.out_features == len(vocab) == len(set(text))
    counts = np.array([text.count(c) for c in vocab], np.float64) / len(text)
    np.testing.assert_allclose(ds.info["unigram_entropy"], -(counts * np.log(counts)).sum())
    # validation comes from the last 10 %, disjoint from training text
    cut = int(len(text) * 0.9)
    first_eval = "".join(vocab[i] for i in ds.eval["x"][0])
    assert first_eval == text[cut : cut + 64]


def test_adding_problem_targets():
    ds = adding_problem(64, 8, 20, seed=3)
    x, y = ds.train["x"], ds.train["y"]
    assert x.shape == (64, 20, 2) and y.shape == (64, 1)
    np.testing.assert_array_equal(x[:, :, 1].sum(axis=1), 2.0)  # two markers each
    assert (x[:, :10, 1].sum(axis=1) == 1).all()  # one in each half
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * x[:, :, 1]).sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(processes):
    ds = make_dataset(DataConfig(name="house_prices", num_train=100, num_eval=10))
    full = StepBatches(ds.train, 16, seed=5)
    parts = [
        StepBatches(ds.train, 16, seed=5, process_index=i, process_count=processes)
        for i in range(processes)
    ]
    for step in (0, 6, 7, 13):  # 100 / 16: step 6 straddles the first epoch boundary
        for key in ("x", "y"):
            got = np.concatenate([p.local(step)[key] for p in parts])
            np.testing.assert_array_equal(got, full[step][key])


def test_prefetched_iteration_resumes_exactly():
    ds = make_dataset(DataConfig(name="classification", num_train=50, num_eval=10))
    batches = StepBatches(ds.train, 8, seed=1)
    straight = list(batches.iterate(0, 20))
    resumed = list(StepBatches(ds.train, 8, seed=1).iterate(12, 20))
    assert len(straight) == 20 and len(resumed) == 8
    for a, b in zip(straight[12:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    for i, b in enumerate(straight):
        np.testing.assert_array_equal(b["y"], batches[i]["y"])
    with pytest.raises(ValueError, match="multiple of the process count"):
        StepBatches(ds.train, 10, seed=1, process_count=4)


def test_npz_refuses_object_arrays_and_mismatched_lengths(tmp_path):
    ok = dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4), x_eval=np.zeros((2, 2)))
    bad_obj = tmp_path / "obj.npz"
    np.savez(bad_obj, **ok, y_eval=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="object arrays.*pickle") as err:
        from_npz(str(bad_obj))
    assert "\n" not in str(err.value)
    bad_len = tmp_path / "len.npz"
    np.savez(bad_len, **ok, y_eval=np.zeros(3))
    with pytest.raises(ValueError, match="x_eval has 2 rows but y_eval has 3"):
        from_npz(str(bad_len))
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        make_dataset(DataConfig(name="digitz"))
