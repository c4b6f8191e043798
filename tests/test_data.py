"""Tests for the data layer: bundled sets, npz/csv/IDX readers, splits, normalization, fitting."""
from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dlc.data.sources import (Dataset, batches, fit_inputs, fit_labels, load_dataset, normalization,
                              normalize, read_idx)
from dlc.core.diagnostics import ArgumentError, DataError, Source, Span
from dlc.language.recipe import Spec, arrays, cifar10, csv, digits, images, iris, mnist, npz

SPAN = Span(Source("model.dln", 'train m {\n    data = npz("d.npz")\n}\n'), 2, 12, 2, 25)


def load(spec: Spec, base_dir: Path = Path("."), seed: int = 0, **kw) -> Dataset:
    return load_dataset(spec, base_dir, seed, span=SPAN, **kw)


def data_error(spec: Spec, base_dir: Path, *fragments: str, **kw) -> DataError:
    """Loading fails with a DataError at SPAN whose message holds every fragment."""
    with pytest.raises(DataError) as info:
        load(spec, base_dir, **kw)
    err = info.value
    assert err.span is SPAN
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err


def ids(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose first feature is the sample's id, so a split can be traced."""
    x = np.stack([np.arange(n), np.arange(n) * 2.0], axis=1)
    return x, np.arange(n) % 3


def write_npz(folder: Path, name: str = "d.npz", **named: np.ndarray) -> Path:
    path = folder / name
    np.savez(path, **named)
    return path


def idx_bytes(a: np.ndarray, type_byte: int = 0x08) -> bytes:
    """An IDX file: two zero bytes, the type byte, the rank, big-endian dims, the data."""
    head = bytes([0, 0, type_byte, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_mnist(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = False,
                parts: tuple[str, ...] = ("train", "t10k")) -> dict[str, np.ndarray]:
    """Small random MNIST-shaped IDX files; returns the arrays written, by file stem."""
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if prefix not in parts:
            continue
        written[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        written[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(exist_ok=True)
    for stem, a in written.items():
        raw = idx_bytes(a)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return written


# --- bundled data sets ------------------------------------------------------------------------

def test_digits_shapes_dtypes_and_default():
    d = load(digits(test=0.2))
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.uint8
    assert d.x_train.max() == 16 and set(np.unique(d.y_train)) == set(range(10))
    assert d.name == "digits" and d.default_normalize == 16.0


def test_iris_shapes_and_default():
    d = load(iris(test=0.2))
    assert d.x_train.shape == (120, 4) and d.x_test.shape == (30, 4)
    assert d.x_train.dtype == np.float32 and d.default_normalize == "standard"
    assert np.bincount(np.concatenate([d.y_train, d.y_test])).tolist() == [50, 50, 50]


def test_bundled_data_loads_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(iris(test=0.0)).x_train.shape == (150, 4)


# --- splits -----------------------------------------------------------------------------------

def test_split_sizes_disjoint_complete_and_rows_kept_together(tmp_path):
    write_npz(tmp_path, x=ids(50)[0], y=ids(50)[1])
    d = load(npz("d.npz", test=0.3), tmp_path)
    assert len(d.x_train) == 35 and len(d.x_test) == 15
    train, test = d.x_train[:, 0], d.x_test[:, 0]
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(50))
    assert np.array_equal(d.y_train, train.astype(int) % 3)
    assert np.array_equal(d.y_test, test.astype(int) % 3)


def test_split_is_determined_by_the_seed():
    a, b, c = (load(digits(test=0.2), seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_test, c.x_test)


def test_test_zero_holds_nothing_out(tmp_path):
    write_npz(tmp_path, x=ids(50)[0], y=ids(50)[1])
    d = load(npz("d.npz", test=0.0), tmp_path)
    assert d.x_train.shape == (50, 2) and d.x_test.shape == (0, 2) and d.y_test.shape == (0,)


def test_a_split_that_leaves_no_training_data_is_an_error():
    x, y = ids(1)
    data_error(Spec("data", "arrays", {"test": 0.6}), Path("."), "leaves none to train on",
               arrays=(x, y))


def test_relative_paths_start_at_base_dir_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write_npz(tmp_path / "sub", x=ids(10)[0], y=ids(10)[1])
    monkeypatch.chdir(tmp_path)
    assert len(load(npz("d.npz", test=0.0), tmp_path / "sub").x_train) == 10


def test_unknown_source_is_an_error():
    err = data_error(Spec("data", "digit", {}), Path("."), "unknown data source `digit`")
    assert "digits" in err.hint


# --- arrays() ---------------------------------------------------------------------------------

def test_arrays_source_serves_the_given_arrays():
    x, y = ids(20)
    d = load(arrays(), arrays=(x, y))
    assert np.array_equal(d.x_train, x) and np.array_equal(d.y_train, y)
    assert len(d.x_test) == 0 and d.default_normalize == "none"


def test_arrays_source_without_arrays_is_an_error():
    data_error(arrays(), Path("."), "from Python")


@pytest.mark.parametrize("x, y, fragment", [
    (np.zeros((5, 2)), np.zeros(4), "5 input sample(s) but 4 label(s)"),
    (np.zeros((0, 2)), np.zeros(0), "inputs are empty"),
    (np.array([["a", "b"]]), np.zeros(1), "inputs are not numbers"),
    (np.array([[1.0, np.nan], [0, 0]]), np.zeros(2), "NaN or infinite values (first in sample 0)"),
    (np.zeros((2, 2)), np.array([0.0, np.inf]), "labels hold NaN"),
])
def test_bad_arrays_are_errors(x, y, fragment):
    data_error(arrays(), Path("."), fragment, arrays=(x, y))


# --- npz --------------------------------------------------------------------------------------

def test_npz_with_custom_keys(tmp_path):
    write_npz(tmp_path, "f.npz", inputs=np.ones((8, 3), np.float32), targets=np.arange(8))
    d = load(npz("f.npz", x="inputs", y="targets", test=0.25), tmp_path)
    assert d.x_train.shape == (6, 3) and d.x_test.shape == (2, 3) and d.name == "npz"


def test_npz_missing_file(tmp_path):
    data_error(npz("nope.npz"), tmp_path, "cannot read nope.npz: no such file", str(tmp_path))


def test_a_device_or_pipe_is_named_as_such_not_as_missing(tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")
    data_error(npz("pipe.npz"), tmp_path, "cannot read pipe.npz: is a device, pipe or socket, not a file")


def test_npz_missing_key_lists_the_keys(tmp_path):
    write_npz(tmp_path, images=np.zeros((2, 2)), y=np.zeros(2))
    err = data_error(npz("d.npz", x="image"), tmp_path, "no array `image`", "holds: images, y")
    assert err.hint == "did you mean `images`?"


def test_npz_refuses_pickled_objects(tmp_path):
    write_npz(tmp_path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    data_error(npz("d.npz"), tmp_path, "pickled")


def test_npz_given_a_npy_file(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros(3))
    data_error(npz("d.npy"), tmp_path, "single .npy array")


@pytest.mark.parametrize("content", [b"not an archive at all", b"PK\x03\x04 broken zip"])
def test_npz_corrupt_file(tmp_path, content):
    (tmp_path / "d.npz").write_bytes(content)
    data_error(npz("d.npz"), tmp_path, "d.npz")


def test_npz_given_a_csv_file_says_so_not_pickled(tmp_path):
    (tmp_path / "d.npz").write_text("1,2,0\n3,4,1\n")
    err = data_error(npz("d.npz"), tmp_path, "d.npz is not a NumPy .npy or .npz file")
    assert "pickle" not in err.message and "np.savez" in err.hint


def huge_npy(shape=(1 << 44,)) -> bytes:
    """An .npy header declaring 128 TiB of float64 (more than any address space), then no data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_npz_too_large_for_memory_is_a_data_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
        zf.writestr("x.npy", huge_npy())
        zf.writestr("y.npy", huge_npy((0,)))
    data_error(npz("d.npz"), tmp_path, "d.npz holds more data than fits in memory", "128")


# --- csv --------------------------------------------------------------------------------------

def write_csv(folder: Path, text: str, name: str = "d.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


TABLE = "a,b,label,c\n1,2,0,3\n\n4,5,1,6\n7,8,2,9\n10,11,0,12\n"


def test_csv_label_by_name(tmp_path):
    write_csv(tmp_path, TABLE)
    d = load(csv("d.csv", label="label", test=0.0), tmp_path)
    assert d.x_train.shape == (4, 3) and d.y_train.shape == (4,)
    row = list(d.x_train[:, 0]).index(4)
    assert d.x_train[row].tolist() == [4, 5, 6] and d.y_train[row] == 1


def test_csv_label_by_negative_index_and_without_header(tmp_path):
    write_csv(tmp_path, "1,2,0\n3,4,1\n")
    d = load(csv("d.csv", label=-1, test=0.0, header=False), tmp_path)
    assert sorted(d.y_train) == [0, 1] and d.x_train.shape == (2, 2)
    d = load(csv("d.csv", label=0, test=0.0, header=False), tmp_path)
    assert sorted(d.y_train) == [1, 3]


def test_csv_byte_order_mark_and_spaces(tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufeffx, y\n1, 2\n".encode("utf-8"))
    assert load(csv("d.csv", label="y", test=0.0), tmp_path).y_train.tolist() == [2.0]


def test_csv_non_numeric_cell_names_file_line_and_column(tmp_path):
    write_csv(tmp_path, "a,b,label\n1,2,0\n3,abc,1\n")
    data_error(csv("d.csv", label="label"), tmp_path, "d.csv:3:", "column 2 (`b`)", "'abc'")


def test_csv_nan_cell_is_an_error(tmp_path):
    write_csv(tmp_path, "1,nan,0\n", name="n.csv")
    data_error(csv("n.csv", header=False), tmp_path, "n.csv:1:", "column 2", "'nan'")


def test_csv_unknown_label_column(tmp_path):
    write_csv(tmp_path, TABLE)
    err = data_error(csv("d.csv", label="lable"), tmp_path, "no column `lable`", "a, b, label, c")
    assert err.hint == "did you mean `label`?"


@pytest.mark.parametrize("text, spec_args, fragment", [
    ("1,2\n", {"label": "y", "header": False}, "without a header"),
    ("1,2\n", {"label": 2, "header": False}, "label=2 is out of range"),
    ("1\n2\n", {"label": 0, "header": False}, "single column"),
    ("a,b\n1,2\n3\n", {"label": "b"}, "d.csv:3: 1 column(s), but the first row has 2"),
    ("a,b\n", {"label": "b"}, "no data rows"),
])
def test_csv_bad_layouts(tmp_path, text, spec_args, fragment):
    write_csv(tmp_path, text)
    data_error(csv("d.csv", **spec_args), tmp_path, fragment)


def test_csv_missing_file(tmp_path):
    data_error(csv("gone.csv"), tmp_path, "cannot read gone.csv: no such file")


def test_csv_that_is_not_text(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"\xff\xfe\x00binary")
    data_error(csv("d.csv"), tmp_path, "cannot read d.csv")


# --- cifar10 (binary batches) -----------------------------------------------------------------

def write_cifar(folder: Path, n: int = 4, test: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Small CIFAR-10 binary batches (a label byte, then 3x32x32 bytes, per record)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + (["test_batch.bin"] if test else []):
        x, y = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        np.concatenate([y[:, None], x.reshape(n, -1)], axis=1).tofile(folder / name)
        written[name] = (x, y)
    return written


def test_cifar10_reads_the_binary_batches_channels_first(tmp_path):
    written = write_cifar(tmp_path / "c" / "cifar-10-batches-bin")  # the archive's folder, found inside
    d = load(cifar10("c"), tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32) and d.default_normalize == 255
    assert np.array_equal(d.x_train[4:8], written["data_batch_2.bin"][0])  # red plane first: [3, 32, 32]
    assert np.array_equal(d.y_test, written["test_batch.bin"][1])
    d = load(cifar10("c/cifar-10-batches-bin", test=0.25), tmp_path)  # a share of the training images
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)


def test_cifar10_mistakes(tmp_path):
    data_error(cifar10("nowhere"), tmp_path, "no such folder: nowhere")
    write_cifar(tmp_path / "c", test=False)
    err = data_error(cifar10("c"), tmp_path, "has no test_batch.bin")
    assert "binary version" in err.hint
    (tmp_path / "c" / "data_batch_3.bin").write_bytes(bytes(3073 * 2 + 5))
    data_error(cifar10("c", test=0.1), tmp_path, "data_batch_3.bin is not a CIFAR-10 binary batch",
               "6151 bytes is not a whole number of 3073-byte records")
    (tmp_path / "c" / "data_batch_3.bin").write_bytes(bytes([12]) + bytes(3072))
    data_error(cifar10("c", test=0.1), tmp_path, "record 0 has label 12")


# --- images (a folder per class) ------------------------------------------------------------

def write_images(folder: Path, sizes: dict) -> dict:
    """PNG (lossless) files of random pixels: {class: [arrays [H, W, 3]]}, one per size given."""
    Image = pytest.importorskip("PIL.Image", reason="images() needs Pillow (pip install 'dlc[images]')")
    rng = np.random.default_rng(0)
    written = {}
    for cls, shapes in sizes.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        written[cls] = []
        for i, shape in enumerate(shapes):
            a = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
            Image.fromarray(a).save(folder / cls / f"{i}.png")
            written[cls].append(a)
    return written


def test_images_label_by_sorted_subfolder_channels_first(tmp_path):
    written = write_images(tmp_path / "pics", {"dog": [(5, 6)] * 2, "cat": [(5, 6)] * 3})
    (tmp_path / "pics" / "cat" / "notes.txt").write_text("not an image: skipped")
    (tmp_path / "pics" / "README.md").write_text("not a class")
    d = load(images("pics", test=0.0), tmp_path)
    assert d.x_train.shape == (5, 3, 5, 6) and d.x_train.dtype == np.uint8 and d.default_normalize == 255
    assert d.y_train.tolist() == [0, 0, 0, 1, 1]  # cat, then dog
    np.testing.assert_array_equal(d.x_train[3], written["dog"][0].transpose(2, 0, 1))
    gray = load(images("pics", gray=True, test=0.0), tmp_path).x_train
    assert gray.shape == (5, 1, 5, 6)
    want = (written["cat"][0] @ [299, 587, 114]) / 1000  # ITU-R 601 luma, as Pillow's "L"
    assert np.abs(gray[0, 0].astype(float) - want).max() <= 1
    resized = load(images("pics", size=[4, 3], test=0.4), tmp_path)
    assert resized.x_train.shape == (3, 3, 4, 3) and resized.x_test.shape == (2, 3, 4, 3)


def test_images_mistakes(tmp_path):
    data_error(images("nowhere"), tmp_path, "no such folder: nowhere")
    write_images(tmp_path / "flat" / "only", {".": [(4, 4)]})
    err = data_error(images("flat/only"), tmp_path, "flat/only has no subfolders")
    assert "flat/only/cat/1.png" in err.hint
    write_images(tmp_path / "mixed", {"a": [(4, 4)], "b": [(4, 5)]})
    err = data_error(images("mixed"), tmp_path, "mixed/b/0.png is 5x4 pixels but mixed/a/0.png is 4x4")
    assert "size=[h, w]" in err.hint
    assert load(images("mixed", size=4, test=0.0), tmp_path).x_train.shape == (2, 3, 4, 4)
    (tmp_path / "mixed" / "empty").mkdir()
    data_error(images("mixed", size=4), tmp_path, "mixed/empty holds no image files")
    (tmp_path / "mixed" / "empty" / "broken.png").write_bytes(b"\x89PNG not really")
    data_error(images("mixed", size=4), tmp_path, "cannot read the image mixed/empty/broken.png")
    with pytest.raises(ArgumentError, match="`size` must be positive"):
        images("mixed", size=[0, 3])


def test_a_model_trains_on_a_folder_of_images_and_a_wrong_size_says_how_to_resize(tmp_path):
    import dlc
    write_images(tmp_path / "pics", {"a": [(9, 7)] * 6, "b": [(9, 7)] * 6})
    src = """model m(x: f32[B, 3, 8, 8]) -> f32[B, 2] {
    return x |> conv2d(4, 3, pad=1, groups=1) |> relu |> global_avgpool |> dense(2)
}
train m {
    data = images("pics", size=[8, 8], test=0.25)
    loss = cross_entropy(output, label)
    epochs = 2
    batch = 4
}
"""
    (tmp_path / "m.dln").write_text(src)
    history = dlc.load(tmp_path / "m.dln").fit()
    assert len(history.epochs) == 2 and set(history.test) == {"loss", "accuracy"}
    (tmp_path / "m.dln").write_text(src.replace("size=[8, 8], ", ""))
    with pytest.raises(DataError) as info:
        dlc.load(tmp_path / "m.dln").fit()
    assert "[3x9x7]" in info.value.message
    assert info.value.hint == "images(..., size=[8, 8]) makes every image the model's input [3x8x8]"


# --- mnist (IDX files) ------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_plain_and_gzipped_idx(tmp_path, gz):
    written = write_mnist(tmp_path / "mnist", gz=gz)
    d = load(mnist("mnist"), tmp_path)
    assert d.x_train.shape == (30, 28, 28) and d.x_test.shape == (10, 28, 28)
    assert d.x_train.dtype == np.uint8 and d.default_normalize == 255.0
    assert np.array_equal(d.x_train, written["train-images-idx3-ubyte"])
    assert np.array_equal(d.y_test, written["t10k-labels-idx1-ubyte"])


def test_mnist_with_test_share_holds_out_training_images(tmp_path):
    write_mnist(tmp_path / "m", parts=("train",))  # no t10k files needed
    d = load(mnist("m", test=0.2), tmp_path)
    assert d.x_train.shape == (24, 28, 28) and d.x_test.shape == (6, 28, 28)


def test_mnist_missing_folder_and_missing_file(tmp_path):
    data_error(mnist("nowhere"), tmp_path, "no such folder: nowhere")
    write_mnist(tmp_path / "m", parts=("train",))
    err = data_error(mnist("m"), tmp_path, "t10k-images-idx3-ubyte")
    assert "t10k-labels-idx1-ubyte" in err.hint


def corrupt(folder: Path, stem: str, raw: bytes) -> None:
    (folder / stem).write_bytes(raw)


def test_mnist_bad_magic_number(tmp_path):
    write_mnist(tmp_path / "m")
    corrupt(tmp_path / "m", "train-images-idx3-ubyte", b"\x1f\x8b\x08\x03" + bytes(100))
    data_error(mnist("m"), tmp_path, "train-images-idx3-ubyte is not an IDX file",
               "bad magic number 1f8b0803")


def test_mnist_truncated_file(tmp_path):
    write_mnist(tmp_path / "m")
    raw = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    corrupt(tmp_path / "m", "train-images-idx3-ubyte", raw[:-100])
    data_error(mnist("m"), tmp_path, "is truncated", "5x28x28 values (3920 bytes)", "3820")
    corrupt(tmp_path / "m", "train-images-idx3-ubyte", raw[:10])
    data_error(mnist("m"), tmp_path, "header is incomplete")


def test_mnist_trailing_bytes(tmp_path):
    write_mnist(tmp_path / "m")
    corrupt(tmp_path / "m", "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(10, np.uint8)) + b"xx")
    data_error(mnist("m"), tmp_path, "2 bytes after")


def test_mnist_wrong_rank(tmp_path):
    write_mnist(tmp_path / "m")
    corrupt(tmp_path / "m", "train-labels-idx1-ubyte", idx_bytes(np.zeros((30, 1), np.uint8)))
    data_error(mnist("m"), tmp_path, "2-dimensional array; expected 1")


def test_mnist_image_and_label_counts_disagree(tmp_path):
    write_mnist(tmp_path / "m")
    corrupt(tmp_path / "m", "train-labels-idx1-ubyte", idx_bytes(np.zeros(29, np.uint8)))
    data_error(mnist("m"), tmp_path, "train has 30 images but 29 labels")


def test_mnist_test_images_of_another_size(tmp_path):
    write_mnist(tmp_path / "m")
    corrupt(tmp_path / "m", "t10k-images-idx3-ubyte", idx_bytes(np.zeros((10, 14, 14), np.uint8)))
    data_error(mnist("m"), tmp_path, "t10k images are 14x14 but training images are 28x28")


def test_mnist_corrupt_gzip(tmp_path):
    write_mnist(tmp_path / "m", gz=True)
    path = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    data_error(mnist("m"), tmp_path, "cannot read train-images-idx3-ubyte.gz")


def test_idx_other_element_types_come_out_in_native_byte_order(tmp_path):
    a = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a, type_byte=0x0B))
    out = read_idx(tmp_path / "a.idx", ndim=2)
    assert np.array_equal(out, a) and out.dtype == np.int16 and out.dtype.isnative


# --- normalize --------------------------------------------------------------------------------

TRAIN = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
TEST = np.array([[7.0, 1.0, 0.0]])


def test_standard_uses_training_statistics_only():
    train, test = normalize(TRAIN, TEST, "standard")
    assert train.dtype == test.dtype == np.float32
    assert np.allclose(train.mean(axis=0), 0, atol=1e-6)
    assert np.allclose(train[:, [0, 2]].std(axis=0), 1)
    assert train[:, 1].tolist() == [0, 0, 0]  # a constant feature: std 0 -> divide by 1
    mean, std = TRAIN.mean(axis=0), np.where(TRAIN.std(axis=0) == 0, 1, TRAIN.std(axis=0))
    assert np.allclose(test, (TEST - mean) / std)


def test_minmax_uses_training_range_only():
    train, test = normalize(TRAIN, TEST, "minmax")
    assert train.min() == 0 and train.max() == 1
    assert np.allclose(test, [[1.5, -4.0, -2 / 7]])


def test_divide_by_a_number_and_none():
    train, test = normalize(np.array([[0, 8, 16]], np.uint8), np.zeros((0, 3), np.uint8), 16.0)
    assert train.tolist() == [[0, 0.5, 1]] and train.dtype == np.float32 and test.shape == (0, 3)
    train, _ = normalize(TRAIN, TEST, "none")
    assert train.dtype == np.float32 and np.array_equal(train, TRAIN)


def test_normalization_statistics_can_be_kept_for_later():
    shift, scale = normalization(np.array([[0, 2], [4, 2]], np.uint8), "standard")
    assert shift.tolist() == [2, 2] and scale.tolist() == [2, 1] and scale.dtype == np.float32
    shift, scale = normalization(TRAIN, 255.0)
    assert shift == 0 and scale == 255


def test_normalize_leaves_its_inputs_alone():
    train = TRAIN.astype(np.float32)
    normalize(train, train[:1], "standard")
    assert np.array_equal(train, TRAIN)


def test_standard_with_an_empty_test_split():
    train, test = normalize(TRAIN, np.zeros((0, 3)), "standard")
    assert test.shape == (0, 3) and train.shape == (3, 3)


@pytest.mark.parametrize("mode", ["zscore", -1.0, 0])
def test_unknown_normalization(mode):
    with pytest.raises(DataError, match="unknown normalization") as info:
        normalize(TRAIN, TEST, mode, span=SPAN)
    assert info.value.span is SPAN


# --- fit_inputs / fit_labels ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64,), (1, 8, 8), (8, 8)])
def test_fit_inputs_reshapes_digits_to_the_model(shape):
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    out = fit_inputs(x, shape)
    assert out.shape == (3,) + shape and np.array_equal(out.reshape(3, 64), x)


def test_fit_inputs_one_feature_per_sample_and_empty_splits():
    assert fit_inputs(np.arange(4.0), (1,)).shape == (4, 1)
    assert fit_inputs(np.zeros((0, 64)), (1, 8, 8)).shape == (0, 1, 8, 8)
    assert fit_labels(np.zeros(0), "f32", (1,)).shape == (0, 1)
    assert fit_labels(np.zeros(0, np.uint8), "i32", (), classes=10).shape == (0,)


def test_fit_inputs_that_cannot_fit_names_both_shapes():
    with pytest.raises(DataError) as info:
        fit_inputs(np.zeros((3, 64)), (1, 28, 28), span=SPAN)
    assert "[64] (64 values)" in info.value.message
    assert "[B, 1x28x28] (784 values)" in info.value.message and info.value.span is SPAN


def test_fit_labels_class_indices():
    out = fit_labels(np.array([0, 3, 9], np.uint8), "i32", ())
    assert out.dtype == np.int32 and out.tolist() == [0, 3, 9]
    out = fit_labels(np.array([[1.0], [2.0]]), "i32", (), classes=3)  # a column of whole floats
    assert out.dtype == np.int32 and out.shape == (2,)


def test_fit_labels_float_targets_take_the_output_shape():
    out = fit_labels(np.array([0, 1, 1]), "f32", (1,))  # bce with output [B, 1]
    assert out.shape == (3, 1) and out.dtype == np.float32
    y = np.random.default_rng(0).normal(size=(4, 3))
    assert np.allclose(fit_labels(y, "f32", (3,)), y)  # mse


@pytest.mark.parametrize("y, dtype, shape, kw, fragment", [
    (np.array([0.0, 1.5]), "i32", (), {}, "fractional"),
    (np.array([0, -1]), "i32", (), {}, "must not be negative, but one is -1"),
    (np.array([0, 10]), "i32", (), {"classes": 10}, "0..9 for 10 classes, but one is 10"),
    (np.zeros((4, 2)), "f32", (3,), {}, "labels have shape [2] per sample, but the loss needs [3]"),
])
def test_fit_labels_errors(y, dtype, shape, kw, fragment):
    with pytest.raises(DataError) as info:
        fit_labels(y, dtype, shape, span=SPAN, **kw)
    assert fragment in info.value.message and info.value.span is SPAN


def test_fit_labels_one_hot_for_class_indices_hints_argmax():
    with pytest.raises(DataError) as info:
        fit_labels(np.eye(3), "i32", ())
    assert "argmax" in info.value.hint


def test_fit_labels_class_indices_for_rows_hint_one_hot():
    """Class indices given to a loss that reads a row per sample (hinge or kl_div over
    [B, K]) name the losses that take indices, and the one-hot rows this one reads."""
    with pytest.raises(DataError) as info:
        fit_labels(np.array([0, 2, 1]), "f32", (3,))
    assert "multi_hinge" in info.value.hint and "np.eye(3)[y]" in info.value.hint


# --- batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rng", [None, np.random.default_rng(3)])
def test_batches_cover_every_index_once_with_the_last_partial_batch(rng):
    parts = list(batches(10, 4, rng))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_batches_order():
    assert np.concatenate(list(batches(7, 3, None))).tolist() == list(range(7))
    a = np.concatenate(list(batches(50, 8, np.random.default_rng(1))))
    b = np.concatenate(list(batches(50, 8, np.random.default_rng(1))))
    assert np.array_equal(a, b) and not np.array_equal(a, np.arange(50))


def test_batches_of_nothing_and_of_one_big_batch():
    assert list(batches(0, 4, None)) == []
    assert [len(p) for p in batches(5, 64, None)] == [5]
