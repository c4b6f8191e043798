"""Data augmentation (the train block's `augment`): what each transform does to a batch,
checked sample by sample with numpy; draws that a resumed run and the ranks of a job repeat;
training that sees the changed inputs while evaluation does not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.language.recipe import crop, cutout, flip, noise
from dlc.runtime.augment import augment, generator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def _batch(shape, seed=0):
    """Values in [1, 2): a zero in a result can only be padding."""
    return np.random.default_rng(seed).uniform(1.0, 2.0, shape).astype(np.float32)


@pytest.mark.parametrize("axis", [-1, -2, 0])
def test_flip_mirrors_about_half_the_samples_along_the_axis(axis):
    x = _batch((400, 2, 3, 5))
    out = augment(x, (flip(axis=axis),), generator(0, 0, 0))
    mirrored = np.flip(x, axis=axis + 4 if axis < 0 else axis + 1)
    same = [np.array_equal(o, a) for o, a in zip(out, x)]
    flipped = [np.array_equal(o, m) for o, m in zip(out, mirrored)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 150 < sum(flipped) < 250, sum(flipped)
    everything = augment(x, (flip(axis=axis, p=1.0),), generator(0, 0, 0))
    np.testing.assert_array_equal(everything, mirrored)


@pytest.mark.parametrize("shape, dims", [((1000, 3, 6, 7), 2), ((300, 4, 9), 1)])
def test_crop_is_a_window_of_the_zero_padded_sample_at_every_offset(shape, dims):
    pad = 2
    x = _batch(shape)
    out = augment(x, (crop(pad=pad, dims=dims),), generator(3, 1, 4))
    assert out.shape == x.shape and out.dtype == x.dtype
    widths = [(0, 0)] * (len(shape) - dims) + [(pad, pad)] * dims
    seen = set()
    for o, sample in zip(out, x):
        padded = np.pad(sample, widths[1:])
        offsets = [off for off in np.ndindex(*[2 * pad + 1] * dims)
                   if np.array_equal(o, padded[(...,) + tuple(slice(d, d + n) for d, n in
                                                             zip(off, sample.shape[-dims:]))])]
        assert len(offsets) == 1, offsets  # (values in [1, 2): only one window matches)
        seen.add(offsets[0])
    assert len(seen) == (2 * pad + 1) ** dims  # every shift from -pad to +pad is drawn


def test_cutout_zeroes_one_square_per_sample_across_its_channels():
    size, h, w = 5, 9, 8
    x = _batch((500, 3, h, w))
    out = augment(x, (cutout(size),), generator(2, 0, 1))
    centres = set()
    for o, sample in zip(out, x):
        zero = o == 0
        assert (zero == zero[0]).all()  # every channel alike
        rows, cols = np.nonzero(zero[0])
        assert len(rows)  # a square centred inside the image always covers its centre
        top, left, bottom, right = rows.min(), cols.min(), rows.max(), cols.max()
        assert zero[0, top:bottom + 1, left:right + 1].all() and zero[0].sum() == (bottom - top + 1) * (right - left + 1)
        assert bottom - top < size and right - left < size
        np.testing.assert_array_equal(o[~zero], sample[~zero])
        # the centre: where the square's full extent (size cells) would sit, clipped by the edges
        centres.add((top + size // 2 if top > 0 else bottom - (size - 1) + size // 2,
                     left + size // 2 if left > 0 else right - (size - 1) + size // 2))
    assert centres == {(r, c) for r in range(h) for c in range(w)}  # every cell is drawn as a centre


def test_noise_adds_zero_mean_values_of_the_given_spread():
    x = _batch((200, 50))
    out = augment(x, (noise(std=0.3),), generator(1, 2, 3))
    added = (out - x).astype(np.float64)
    assert abs(added.mean()) < 0.01 and abs(added.std() - 0.3) < 0.01


def test_draws_repeat_for_the_same_seed_epoch_and_batch_and_leave_the_data_alone():
    data = _batch((64, 1, 8, 8))
    view = data[10:42]  # an unshuffled pass gives views of the data
    before = data.copy()
    specs = (flip(), crop(pad=1), noise(std=0.1))
    a = augment(view, specs, generator(5, 2, 7))
    np.testing.assert_array_equal(a, augment(view, specs, generator(5, 2, 7)))
    assert not np.array_equal(a, augment(view, specs, generator(5, 2, 8)))
    assert not np.array_equal(a, augment(view, specs, generator(5, 3, 7)))
    np.testing.assert_array_equal(data, before)


NET = """
model net(x: f32[B, 1, 8, 8]) -> f32[B, 10] {
    return x |> conv2d(4, 3, pad=1) |> relu |> flatten |> dense(10)
}
train net {
    data = digits(test=0.2)
    loss = cross_entropy(output, label)
    optimizer = adam(lr=0.01)
    batch = 64
    epochs = 2
    augment = [flip, crop(pad=1), noise(std=0.1)]
}
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.dln"
    path.write_text(NET)
    return path


def test_training_sees_the_augmented_inputs_and_evaluation_the_plain_ones(net):
    augmented, plain = dlc.load(net), dlc.load(net)
    h = augmented.fit()
    h_plain = plain.fit(augment=False)
    assert h.epochs[-1]["train_loss"] != h_plain.epochs[-1]["train_loss"]
    assert any(not np.array_equal(augmented.params[k], v) for k, v in plain.params.items())
    # the test split is scored as it is: evaluate() again gives the same numbers
    assert augmented.evaluate() == pytest.approx(h.test, rel=1e-6)
    # the reference interpreter is given the same batches: the same training, to rounding
    reference = dlc.load(net)
    reference.fit(target="reference")
    for k, v in augmented.params.items():
        np.testing.assert_allclose(reference.params[k], v, rtol=1e-3, atol=1e-4, err_msg=k)


def test_a_resumed_run_augments_its_batches_as_the_straight_run(net, tmp_path):
    straight = dlc.load(net)
    straight.fit(epochs=3)
    first = dlc.load(net)
    first.fit(epochs=1, save=tmp_path / "half.npz")
    second = dlc.load(net)
    second.fit(epochs=3, resume=tmp_path / "half.npz")
    for name, value in straight.params.items():
        np.testing.assert_array_equal(second.params[name], value, err_msg=name)


def test_the_command_line_overrides_and_checks_augment(net):
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "dlc", "run", str(net), "--epochs", "1", "--quiet", *flags],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    r = run("--augment", "flip(axis=3)")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--augment:1:1: error: `flip`: a sample of `x` (f32[B,1,8,8]) has 3 axes" in r.stderr, r.stderr
    r = run("--augment", "[]")
    assert r.returncode == 0 and "net: train loss" in r.stdout, r.stdout + r.stderr
    out = subprocess.run([sys.executable, "-m", "dlc", "check", str(net)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT).stdout
    assert "augment [flip(axis=-1, p=0.5), crop(pad=1, dims=2), noise(std=0.1)]" in out, out


def _mpi_missing() -> str | None:
    from dlc.core.diagnostics import UsageError
    from dlc.runtime.distributed import find_mpiexec
    try:
        import mpi4py  # noqa: F401
        find_mpiexec()
    except (ImportError, UsageError) as e:
        return f"needs mpi4py and mpiexec (pip install 'dlc[mpi]'): {e}"
    return None


@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
def test_two_ranks_augment_the_global_batch_as_one_process(net, tmp_path):
    ck = tmp_path / "ck.npz"
    r = subprocess.run([sys.executable, "-m", "dlc", "run", str(net), "--epochs", "1", "--quiet", "--save", str(ck),
                        "--ranks", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = dlc.load(net)
    ranks.load_weights(ck)
    one = dlc.load(net)
    one.fit(epochs=1)
    for k, v in one.params.items():
        np.testing.assert_allclose(ranks.params[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
