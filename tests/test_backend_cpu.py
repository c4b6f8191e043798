"""The CPU backend against the reference interpreter: every op-table row (forward and
gradient) and every example's training step, plus the compile cache, artifacts and threads.

Op-table rows are compiled many to one module (one native step per chunk of rows), so
the whole table costs a few LLVM compilations rather than hundreds.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dlc
from dlc.core import ops
from dlc import artifact, backends
from dlc.backends.llvm.codegen import ModuleBuilder
from dlc.backends.reference import run_graph
from dlc.core.graph import Graph, Node
from dlc.language.overrides import override_config
from dlc.passes.autodiff import autodiff
from dlc.pipeline import kernel_program, lower
from dlc.program import make_program

import example_models
from example_models import EXAMPLES, example_feeds as _example_feeds
from op_table import ALL
from test_fuzz import FUZZ
from test_ops import Built, _grad_graph, in_precision

CHUNK = 24  # op-table rows per compiled module


def merge(graphs: list[Graph]) -> Graph:
    """One graph holding several: inputs and results prefixed `r<i>.`."""
    out = Graph("merged")
    for i, g in enumerate(graphs):
        new: dict[int, int] = {}
        for nid in g.toposort():
            n = g.node(nid)
            attrs = n.attrs
            if n.op is ops.INPUT:
                attrs = dict(attrs, name=f"r{i}.{attrs['name']}")
            new[nid] = out.add(Node(n.op, tuple(new[o] for o in n.operands), attrs, n.type, n.span))
        out.outputs.update({f"r{i}.{k}": new[v] for k, v in g.outputs.items()})
        out.updates.update({f"r{i}.{k}": new[v] for k, v in g.updates.items()})
    return out


CPU = backends.backend("cpu")


def run_cpu(graph: Graph, feeds: dict, threads: int = 2, templates=None, without: str | None = None) -> dict:
    """Compile a static-shape graph to one native step and run it once (with the
    backend's templates, or those given: none, the generic loop nests; for the host, or
    the host `without` a feature family, e.g. "avx512": AVX2 code)."""
    target = CPU.target({"threads": threads})
    if without:
        target = target.without(without)
    compiled = CPU.compile(kernel_program(lower(graph, 1), CPU.templates if templates is None else templates), target)
    step = CPU.load(compiled.blobs, compiled.layout, target)
    state = {name: np.array(feeds[name], copy=True) for name, kind, _, _ in compiled.layout.slots
             if kind == "state"}
    out = step.run(state, feeds)
    out.update({f"update:{k}": v for k, v in state.items()})
    return out


def _rows():
    return [c for c in ALL if not c.xfail]


def _chunks():
    rows = _rows()
    return [pytest.param(rows[i:i + CHUNK], id=f"rows{i}-{i + len(rows[i:i + CHUNK]) - 1}")
            for i in range(0, len(rows), CHUNK)]


@pytest.mark.parametrize("rows", _chunks())
def test_op_table_forward_and_gradient_on_cpu(rows):
    """Each row's output, its state updates and (for differentiable rows) its gradients
    match the reference interpreter in float32. Shapes are the table's awkward ones."""
    merged, feeds, tols = op_table_graph(rows, salt="cpu")
    check_op_table(run_graph(merged, feeds), run_cpu(merged, feeds), tols)


def test_direct_filter_gradient_sums_over_image_tiles(monkeypatch):
    """A first layer's filter gradient passes over the images in tiles, its accumulators
    kept in scratch between tiles: with one image per tile, on one thread and on two, the
    op table's direct rows still match the reference."""
    from dlc.backends.llvm import conv
    monkeypatch.setattr(conv, "_DIRECT_TILE_BYTES", 1)
    rows = [c for c in ALL if c.id and c.id.startswith("t-direct")]
    assert len(rows) >= 2
    merged, feeds, tols = op_table_graph(rows, salt="tiles")
    expected = run_graph(merged, feeds)
    for threads in (1, 2):
        check_op_table(expected, run_cpu(merged, feeds, threads), tols)


def _compiled_here(monkeypatch) -> None:
    """Compiles build their code in this process (not a forked one, BUILD_IN_CHILD), where
    a test's spies on the code generator see it."""
    import dlc.backends.llvm as cpu
    monkeypatch.setattr(cpu, "BUILD_IN_CHILD", False)


def _count_prefetches(monkeypatch) -> list:
    """The locality of every prefetch the convolution templates emit from here on."""
    from dlc.backends.llvm import conv
    _compiled_here(monkeypatch)
    emitted = []

    class Counting(conv._Vec):
        def prefetch(self, ptr, write, locality=3):
            emitted.append(locality)
            super().prefetch(ptr, write, locality)
    monkeypatch.setattr(conv, "_Vec", Counting)
    return emitted


def test_the_vector_filter_gradient_prefetching_the_next_image_matches(monkeypatch):
    """Where its inputs outgrow L2 the vector filter gradient prefetches the next image
    (here: L2 taken as 0 bytes; every row's taps read all of x): its op-table rows still
    match the reference on 1, 2 and 3 threads, and the prefetches were emitted."""
    if CPU.target({}).vector_width != 16:
        pytest.skip("the vector filter gradient needs AVX-512")
    from dlc.backends.llvm import conv
    emitted = _count_prefetches(monkeypatch)
    monkeypatch.setattr(conv, "_L2_BYTES", 0)
    rows = [c for c in ALL if c.id and c.id.startswith("t-vector-filter")]
    merged, feeds, tols = op_table_graph(rows, salt="prefetch")
    expected = run_graph(merged, feeds)
    for threads in (1, 2, 3):
        check_op_table(expected, run_cpu(merged, feeds, threads), tols)
    assert emitted and set(emitted) == {2}


def test_a_1x1_product_prefetching_the_next_image_matches(monkeypatch):
    """Where a batch outgrows L2 (here: L2 taken as 0 bytes), a 1x1 stride-1 layer's
    forward and data gradient prefetch the next image into L2 as they go: their op-table
    rows still match the reference on 1, 2 and 3 threads (the batch split over images,
    then over rows), and the prefetches were emitted; a strided 1x1 layer's were not."""
    from dlc.backends.llvm import conv
    emitted = _count_prefetches(monkeypatch)
    monkeypatch.setattr(conv, "_L2_BYTES", 0)
    assert conv._prefetches_next(64, 64 * 256, 64 * 256, 1, (1, 1), (0, 0))
    assert not conv._prefetches_next(64, 64 * 256, 64 * 256, 9, (1, 1), (1, 1))
    assert not conv._prefetches_next(64, 64 * 256, 64 * 256, 1, (2, 2), (0, 0))
    rows = [c for c in ALL if c.id in ("t-1x1", "t-1x1-data")]
    assert len(rows) == 2
    merged, feeds, tols = op_table_graph(rows, salt="prefetch-next")
    expected = run_graph(merged, feeds)
    for threads in (1, 2, 3):
        check_op_table(expected, run_cpu(merged, feeds, threads), tols)
    assert emitted and set(emitted) == {2}
    emitted.clear()
    strided = [c for c in ALL if c.id == "t-1x1-stride2"]
    merged, feeds, tols = op_table_graph(strided, salt="prefetch-strided")
    check_op_table(run_graph(merged, feeds), run_cpu(merged, feeds, 2), tols)
    assert 2 not in emitted


def test_dilated_convolutions_read_their_spaced_taps_on_every_thread_count(monkeypatch):
    """A dilated convolution (and both its gradients) is a packed GEMM whose im2col reads
    each tap at its spaced offset, or a direct form with spaced taps: the plane-wise
    forward and data gradient (AVX-512, a batch of 32 images) and the direct filter
    gradient. The op table's dilated template
    rows -- "same" padding over whole planes, unpadded rows, a stride along a dilated
    axis, a gathered stride of 3, and the plane-wise shapes -- match the reference on 1, 2
    and 3 threads (and as generic loop nests); the packers read taps spaced as the rows'
    dilations, and the plane-wise tiles and direct filter gradients were built with them."""
    from dlc.backends.llvm import conv
    _compiled_here(monkeypatch)
    spacings, planes = [], []
    real, real_planes = conv._im2col_fn, conv._planes_tile_fn

    def spy(mb, g, row_stride):
        rows, cols = sorted({r for r, _ in g.taps}), sorted({c for _, c in g.taps})
        spacings.append((rows[1] - rows[0] if len(rows) > 1 else 0, cols[1] - cols[0] if len(cols) > 1 else 0))
        return real(mb, g, row_stride)
    monkeypatch.setattr(conv, "_im2col_fn", spy)
    monkeypatch.setattr(conv, "_planes_tile_fn", lambda mb, geom, rows: planes.append(geom[12:]) or
                        real_planes(mb, geom, rows))
    direct, real_direct = [], conv._direct_filter_gradient
    monkeypatch.setattr(conv, "_direct_filter_gradient", lambda mb, em, t, *rest: direct.append(
        t.inputs[0].shape[1]) or real_direct(mb, em, t, *rest))
    rows = [c for c in ALL if c.id and c.id.startswith("t-dilated")]
    assert len(rows) == 20
    merged, feeds, tols = op_table_graph(rows, salt="dilated")
    expected = run_graph(merged, feeds)
    for threads in (1, 2, 3):
        check_op_table(expected, run_cpu(merged, feeds, threads), tols)
    check_op_table(expected, run_cpu(merged, feeds, 2, templates=frozenset()), tols)  # the generic nests
    # the forwards' and filter gradients' taps as their dilations space them ("same",
    # "valid" and "gather"; "strided"); a strided data gradient's phases read the taps
    # that reach them, a stride apart in g
    assert {(2, 2), (3, 2), (2, 3)} <= set(spacings), spacings
    wide = CPU.target({}).vector_width == 16
    if wide:  # the plane-wise rows (not the over-padded one)
        assert sorted(set(planes)) == [(1, 2), (2, 2), (2, 3)], planes
    assert sorted(set(direct)) == ([2, 11] if wide else [2]), direct  # the direct filter gradients' channels


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 20))
@given(st.data())
def test_random_convolutions_match_the_reference(data):
    """A random convolution's forward, data gradient and filter gradient (batches of 2,
    32 and 33, so the forms that split by images or need 32 of them take their turn;
    1-64 channels, kernels of 1-5, strides and dilations of 1-3 and padding up to the
    kernel's span, each per axis) match the reference on two threads. Such a hunt found
    an im2col loop that ignored a stride down the columns and a data gradient that wrote
    outside its scratch for a layer padded by more than its kernel spans."""
    from op_table import conv_layer_rows
    draw = data.draw
    n = draw(st.sampled_from([2, 32, 33]), "batch")
    c, o = (draw(st.sampled_from([1, 3, 5, 16, 32, 64]), what) for what in ("in channels", "out channels"))
    hw = tuple(draw(st.integers(3, 33), "size") for _ in range(2))
    kernel = tuple(draw(st.integers(1, 5), "kernel") for _ in range(2))
    stride = tuple(draw(st.sampled_from([1, 1, 2, 3]), "stride") for _ in range(2))
    dilation = tuple(draw(st.sampled_from([1, 1, 2, 3]), "dilation") for _ in range(2))
    pad = tuple(draw(st.integers(0, k * d), "pad") for k, d in zip(kernel, dilation))
    out = tuple(ops.linalg.conv_out(*a) for a in zip(hw, kernel, stride, pad, dilation))
    assume(min(out) >= 1 and n * max(c, o) * max(hw[0] * hw[1], out[0] * out[1]) <= 400_000)
    attrs = {"stride": stride, "pad": pad, **ops.linalg.dilation_attr(dilation)}
    rows = conv_layer_rows((n, c) + hw, (o, c) + kernel, attrs, "random")
    merged, feeds, tols = op_table_graph(rows, salt="random-conv")
    check_op_table(run_graph(merged, feeds), run_cpu(merged, feeds), tols)


def _rows_match_on_path(monkeypatch, path: str, rows, salt: str, thread_counts, without=None, module=None) -> None:
    """The op table's `rows` match the reference on each thread count, bit for bit the
    same on each (what lets `--threads auto` change counts mid-run), and every row took
    `path` (a function of `module`, backends/llvm/conv.py when None) on each (see run_cpu
    for `without`)."""
    from dlc.backends.llvm import conv
    module = module or conv
    _compiled_here(monkeypatch)
    taken = []
    real = getattr(module, path)
    monkeypatch.setattr(module, path, lambda *a: taken.append(1) or real(*a))
    merged, feeds, tols = op_table_graph(rows, salt=salt)
    expected = run_graph(merged, feeds)
    first = None
    for threads in thread_counts:
        got = run_cpu(merged, feeds, threads, without=without)
        check_op_table(expected, got, tols)
        first = first or got
        for key in expected:
            np.testing.assert_array_equal(got[key], first[key], err_msg=f"{key} on {threads} threads")
    assert len(taken) == len(thread_counts) * len(rows)


def _filter_template(C, O, OW, k=3, stride=1, N=64):
    """The shapes a filter gradient's rule reads: N square images, "same" padding."""
    from types import SimpleNamespace
    return SimpleNamespace(output=SimpleNamespace(shape=(O, C, k, k)),
                           inputs=[SimpleNamespace(shape=(N, C, OW * stride, OW * stride)),
                                   SimpleNamespace(shape=(N, O, OW, OW))],
                           attrs={"stride": (stride, stride)})


def _forward_template(N, C, O, OW, k=3, stride=1):
    """The shapes a forward convolution's rule reads (square images)."""
    from types import SimpleNamespace
    return SimpleNamespace(inputs=[SimpleNamespace(shape=(N, C, OW, OW)), SimpleNamespace(shape=(O, C, k, k))],
                           output=SimpleNamespace(shape=(N, O, OW, OW)), attrs={"stride": (stride, stride)})


def _vector_target(w):
    from types import SimpleNamespace
    return SimpleNamespace(vector_width=w)


# Each AVX-512 form of backends/llvm/conv.py and the op-table rows written for it: the
# rows take that form where the target has AVX-512, on each thread count, and match the
# reference.
_AVX512_FORMS = {
    # 11 -> 20 channels on 16-wide rows, 5x5: four blocks of output channels, the last
    # short, padding on every side
    "_direct_filter_gradient": ("t-wide-direct", 1, (1, 2)),
    # a first layer, a 2x2 kernel unpadded, 11 -> 20 channels, padding of 2 (op_table.py)
    "_window_filter_gradient": ("t-window-filter", 4, (1, 2, 3)),
    # over flat planes: LeNet's first layer, a short last vector, a 3x5 kernel, one image
    "_flat_filter_gradient": ("t-flat-filter", 4, (1, 2, 3)),
    # LeNet's second layer; a strided padded layer with a short last block of positions;
    # a 3x2 kernel; two vectors of output channels; a 1x1 kernel over three; rows with no
    # position whose taps all lie inside them; two tiles of two vectors each
    "_vector_filter_gradient": ("t-vector-filter", 7, (1, 2, 3)),
    # padded 3x3 on 8-wide rows and unpadded 5x5 on 5-wide rows, each with a last tile of
    # one row
    "_direct_forward": ("t-direct-forward", 2, (1, 2, 3)),
    # LeNet's first layer; 12-wide rows with a last tile of one row; a 3x5 kernel padded
    # along one axis; two blocks of output channels; rows of two vectors read in place,
    # padded and not
    "_planes_forward": ("t-planes-forward", 6, (1, 2, 3)),
    # one block of channels; two blocks, a 5x3 kernel padded unevenly; unpadded
    "_planes_data": ("t-planes-data", 3, (1, 2, 3)),
    # strided onto 16 channels, 32 channels (two blocks), and by a 2x2 kernel at stride 3
    "_strided_data": ("t-strided-data", 3, (1, 2, 3)),
    # F(2x2, 3x3) and F(4x4, 3x3), forward and data gradient, padded and not, dilated
    # (op_table.py)
    "_winograd": ("t-winograd", 10, (1, 2, 3)),
    # its filter gradient: F(2x2) and F(4x4), panels of several images and of one, dilated
    "_winograd_filter": ("t-wino-filter", 5, (1, 2, 3)),
}


@pytest.mark.parametrize("path", sorted(_AVX512_FORMS))
def test_avx512_forms_take_their_op_table_rows(monkeypatch, path):
    if CPU.target({}).vector_width != 16:
        pytest.skip(f"{path} needs AVX-512 (32 vector registers, 16 channels to a vector)")
    prefix, count, thread_counts = _AVX512_FORMS[path]
    rows = [c for c in ALL if c.id and c.id.startswith(prefix)]
    assert len(rows) == count
    _rows_match_on_path(monkeypatch, path, rows, prefix, thread_counts)


@pytest.mark.parametrize("path", ["_winograd", "_winograd_filter"])
def test_winograd_takes_its_rows_in_avx2_code_too(monkeypatch, path):
    """The Winograd forms' op-table rows (F(2x2) and F(4x4), forward and data gradient,
    then the filter gradient, dilated and not) compiled for the host without AVX-512:
    8-wide vectors and transposes, the microkernel with 16 registers."""
    if not CPU.target({}).has("avx2"):
        pytest.skip("needs an x86 host with AVX2 to run AVX2 code")
    prefix = _AVX512_FORMS[path][0]
    rows = [c for c in ALL if c.id and c.id.startswith(prefix)]
    _rows_match_on_path(monkeypatch, path, rows, prefix, (2,), without="avx512")


@pytest.mark.parametrize("avx2", [False, True], ids=["host", "avx2"])
def test_a_short_c_times_a_transposed_b_takes_the_dot_products(monkeypatch, avx2):
    """A small batch's data gradient (op-table rows nt-dots*: 8 rows of C, 13 rows of B in
    blocks of 3; 2 rows and a masked last vector along k) runs
    templates._dots_in_registers on 1, 2 and 3 threads, matches the reference and gives
    the same bits on each; and in AVX2 code."""
    from dlc.backends.llvm import templates
    if avx2 and not CPU.target({}).has("avx512f"):
        pytest.skip("the host's code is the AVX2 code")
    rows = [c for c in ALL if c.id and c.id.startswith("nt-dots")]
    assert len(rows) == 2
    _rows_match_on_path(monkeypatch, "_dots_in_registers", rows, "nt-dots", (2,) if avx2 else (1, 2, 3),
                        without="avx512" if avx2 else None, module=templates)


def test_the_direct_filter_gradient_takes_the_layers_it_was_measured_faster_on():
    """First layers always; with 32 vector registers also wider stride-1 layers whose
    output rows fill the vectors (half of them where the GEMM would be one vector wide)
    and whose tiles of images give the accumulators enough work between trips to
    scratch; never a 1x1 kernel or a strided one; with 16 registers (AVX2) the first
    layers only."""
    from dlc.backends.llvm.conv import _direct_channels

    def direct(C, O, OW, k=3, stride=1, w=16):
        return _direct_channels(_filter_template(C, O, OW, k, stride), _vector_target(w)) > 0

    assert direct(3, 32, 32) and direct(1, 6, 28, k=5) and direct(3, 32, 32, w=8)
    assert direct(16, 16, 32) and direct(32, 64, 16) and direct(32, 32, 16, k=5)
    assert direct(6, 16, 10, k=5) and not direct(6, 17, 10, k=5)  # 10 of 16 lanes
    assert not direct(64, 64, 8)                                    # half the lanes
    assert not direct(64, 64, 16, k=1) and not direct(16, 32, 16, stride=2)
    assert not direct(16, 16, 32, w=8) and not direct(32, 64, 16, w=8)
    assert direct(64, 64, 32) and not direct(128, 128, 16)          # one image per tile


def test_the_window_filter_gradient_takes_small_kernels_of_narrow_stride_1_layers():
    """With AVX-512: stride 1, a kernel of more than one row whose taps fit 30 registers
    with two blocks of output channels (3x3: 2 channels a block; 2x2: 6); first layers
    (at most 3 input channels), and up to 32 input channels output rows of one vector,
    85% filled."""
    from dlc.backends.llvm.conv import _window_channels

    def channels(C, O, OW, k=3, stride=1, w=16):
        return _window_channels(_filter_template(C, O, OW, k, stride), _vector_target(w))

    assert channels(3, 32, 32) == 2 and channels(32, 64, 16) == 2 and channels(11, 20, 14) == 2
    assert channels(3, 6, 8) == 2 and channels(1, 6, 28, k=2) == 6
    assert channels(33, 32, 16) == 0 and channels(16, 16, 32) == 0   # 33 channels; rows of 2 vectors
    assert channels(6, 16, 4) == 0 and channels(6, 16, 13) == 0      # 4 or 13 of 16 lanes
    assert channels(1, 6, 28, k=5) == 0 and channels(3, 32, 32, k=1) == 0
    assert channels(3, 32, 32, stride=2) == 0 and channels(3, 32, 32, w=8) == 0


def test_the_window_filter_gradient_of_a_first_layer_prefetches_the_next_images_g(monkeypatch):
    """A first layer's window filter gradient (at most 3 input channels) prefetches the
    next image's block of g into L2 as it goes, a wider layer's does not; their op-table
    rows match the reference either way."""
    if CPU.target({}).vector_width != 16:
        pytest.skip("the window filter gradient needs AVX-512")
    emitted = _count_prefetches(monkeypatch)
    for row_id, prefetches in (("t-window-filter-first", True), ("t-window-filter-wide", False)):
        emitted.clear()
        rows = [c for c in ALL if c.id == row_id]
        merged, feeds, tols = op_table_graph(rows, salt="window-prefetch")
        check_op_table(run_graph(merged, feeds), run_cpu(merged, feeds, 2), tols)
        assert (2 in emitted) == prefetches, row_id


def test_the_flat_filter_gradient_sums_the_same_on_any_thread_count():
    """Its threads share out chunks of images fixed by the batch, and every element adds
    the chunks' sums in order: 1, 2 and 3 threads give the same bits."""
    if CPU.target({}).vector_width != 16:
        pytest.skip("the flat filter gradient needs AVX-512")
    rows = [c for c in ALL if c.id and c.id.startswith("t-flat-filter")]
    merged, feeds, _ = op_table_graph(rows, salt="threads")
    one, *more = (run_cpu(merged, feeds, threads) for threads in (1, 2, 3))
    for other in more:
        for key, value in one.items():
            assert np.array_equal(other[key], value), key


def test_the_flat_filter_gradient_takes_same_padded_first_layers_whose_rows_leave_lanes_idle():
    """With AVX-512: stride 1, x's rows as wide as g's, rows that no whole number of
    vectors fills, at most 3 input channels, at most 14 output channels (at least two taps
    a group: (30 registers) // (channels + 1)) and one image's g within 32 KiB. LeNet's
    first layer: 4 taps a group."""
    from types import SimpleNamespace

    from dlc.backends.llvm.conv import _flat_filter_taps

    def taps(C, O, OW, k=3, stride=1, w=16, N=64):
        return _flat_filter_taps(_filter_template(C, O, OW, k, stride, N), _vector_target(w))

    assert taps(1, 6, 28, k=5) == 4 and taps(3, 4, 13) == 6 and taps(1, 14, 10) == 2
    assert taps(1, 2, 8) == 9                               # all taps in one group
    assert taps(1, 15, 10) == 0 and taps(4, 6, 28) == 0     # one tap a group; 4 channels
    assert taps(3, 32, 32) == 0 and taps(1, 6, 28, w=8) == 0 and taps(1, 6, 14, stride=2) == 0
    assert taps(1, 8, 56) == 0                              # g's image 98 KiB
    valid = SimpleNamespace(output=SimpleNamespace(shape=(6, 1, 5, 5)),
                            inputs=[SimpleNamespace(shape=(64, 1, 32, 32)), SimpleNamespace(shape=(64, 6, 28, 28))],
                            attrs={"stride": (1, 1)})
    assert _flat_filter_taps(valid, _vector_target(16)) == 0  # rows of 32 in x, 28 in g


def test_the_vector_filter_gradient_takes_whole_vectors_of_channels_where_rows_do_not():
    """With AVX-512: output channels in whole vectors of 16, at most 64 input channels, at
    most 28 taps, and a stride, output rows that fill less than 85% of their vectors or a
    1x1 kernel. Tiles of one or two vectors of output channels (dividing O's), whichever
    loads less per multiply-add, each with the largest divisor of the input channels
    whose taps fit 28 accumulators."""
    from dlc.backends.llvm.conv import _vector_filter_tile

    def tile(C, O, OW, k=3, stride=1, w=16):
        return _vector_filter_tile(_filter_template(C, O, OW, k, stride), _vector_target(w))

    assert tile(6, 16, 10, k=5) == (1, 1) and tile(6, 16, 8) == (3, 1) and tile(16, 16, 8) == (2, 1)
    assert tile(16, 16, 16, stride=2) == (2, 1) and tile(7, 16, 8) == (1, 1)
    assert tile(16, 32, 16, stride=2) == (1, 2) and tile(64, 64, 8) == (1, 2)   # 2 x 9 taps
    assert tile(6, 32, 10, k=5) == (1, 1)                                      # 2 x 25 taps: too many
    assert tile(64, 64, 16, k=1) == (8, 2) and tile(12, 64, 16, k=1) == (12, 2)
    assert tile(20, 48, 16, k=1) == (20, 1)                                    # 3 vectors: not pairs
    assert tile(16, 16, 32) == 0 and tile(6, 17, 10, k=5) == 0 and tile(6, 16, 10, k=7) == 0
    assert tile(128, 128, 8, k=1) == 0 and tile(128, 128, 8) == 0
    assert tile(6, 16, 10, k=5, w=8) == 0


def test_the_direct_filter_gradient_passes_over_one_image_where_its_g_rows_fill_l1():
    """Images per pass over the items: one where one image's g rows of a block of output
    channels reach 16 KiB (8 channels of 32x32), else as many as fit 256 KiB with the
    x planes."""
    from dlc.backends.llvm.conv import _direct_images_per_tile

    assert _direct_images_per_tile(_filter_template(3, 32, 32), 8) == 1
    assert _direct_images_per_tile(_filter_template(16, 16, 32), 8) == 1
    assert _direct_images_per_tile(_filter_template(32, 32, 16), 8) == 6
    assert _direct_images_per_tile(_filter_template(1, 6, 28, k=5), 6) == 1
    assert _direct_images_per_tile(_filter_template(1, 6, 28, k=5, N=8), 2) == 8


def test_the_direct_forward_takes_sixteen_output_channels_over_enough_taps():
    """With AVX-512: 16 output channels, stride 1, at least 64 taps, rows of at most 16
    and a batch of at least 32 (split by images); tiles of whole rows up to 16 positions."""
    from dlc.backends.llvm.conv import _direct_forward_rows

    def rows(N, C, O, OW, k=3, stride=1, w=16):
        return _direct_forward_rows(_forward_template(N, C, O, OW, k, stride), _vector_target(w))

    assert rows(64, 6, 16, 10, k=5) == 1 and rows(64, 16, 16, 8) == 2 and rows(64, 32, 16, 5) == 3
    assert rows(64, 8, 16, 16) == 1 and rows(64, 16, 16, 20) == 0  # rows of 20: the GEMM
    assert rows(64, 3, 16, 16) == 0 and rows(64, 16, 16, 32) == 0  # 27 taps; rows of 32
    assert rows(64, 16, 32, 16) == 0 and rows(64, 16, 16, 16, stride=2) == 0
    assert rows(16, 16, 16, 32) == 0 and rows(64, 16, 16, 32, w=8) == 0


def test_the_planes_form_takes_stride_1_layers_in_the_tile_with_fewest_loads():
    """With AVX-512: stride 1, a kernel larger than 1x1, rows of positions filling at
    least 3/4 of their vectors and a batch of at least 32 (split by images); the tile (R
    rows, OB output channels, OB dividing them) in 24 accumulators with the fewest loads
    and broadcasts per multiply-add (the larger OB on a tie), at most 0.625. The data
    gradient's rule is the forward's with the channels swapped."""
    from types import SimpleNamespace

    from dlc.backends.llvm.conv import _planes_data_tile, _planes_forward_tile

    def tile(N, C, O, OW, k=3, stride=1, w=16):
        return _planes_forward_tile(_forward_template(N, C, O, OW, k, stride), _vector_target(w))

    assert tile(64, 1, 6, 28, k=5) == (2, 6) and tile(64, 3, 5, 12) == (4, 5)
    assert tile(64, 16, 16, 32) == (3, 4) and tile(64, 32, 64, 16) == (6, 4) and tile(64, 3, 32, 32) == (3, 4)
    assert tile(64, 3, 12, 16) == (4, 6)                                 # 6 x 4 as good: the larger OB
    assert tile(64, 3, 13, 16) == 0 and tile(64, 8, 7, 32) == 0          # 13 or 7 channels: 1 row a tile
    assert tile(64, 3, 6, 11) == 0 and tile(64, 64, 64, 8) == 0          # rows of 11 or 8: idle lanes
    assert tile(64, 64, 64, 16, k=1) == 0 and tile(64, 16, 16, 32, stride=2) == 0
    assert tile(31, 1, 6, 28) == 0 and tile(64, 16, 16, 32, w=8) == 0

    def data(N, O, C, OW, k=3, pad=1, dilation=(1, 1)):
        g = SimpleNamespace(shape=(N, O, OW, OW))
        attrs = {"stride": (1, 1), "pad": (pad, pad), "dilation": dilation}
        return _planes_data_tile(SimpleNamespace(inputs=[g, SimpleNamespace(shape=(O, C, k, k))],
                                                 output=SimpleNamespace(shape=(N, C, OW, OW)), attrs=attrs),
                                 _vector_target(16))

    assert data(64, 16, 16, 32) == (3, 4) and data(64, 32, 5, 12) == (4, 5) and data(64, 5, 32, 12) == (6, 4)
    # padded by more than the kernel spans, g would be padded by a negative amount: not
    # this form (it read and wrote outside its copy of g); dilated, the kernel spans more
    assert data(64, 16, 16, 32, pad=3) == 0 and data(64, 16, 16, 32, pad=3, dilation=(2, 2)) == (3, 4)


def test_winograd_rule():
    """With AVX-512 or AVX2: a 3x3 kernel, stride 1, 32 channels or more each way (whole
    vectors of them, at most 384 in), a batch of at least 32; F(4x4, 3x3) where it makes
    16 tiles (16x16 outputs, or a dilated layer's phases of 8x8), F(2x2, 3x3) where it
    makes 16 (8x8), else none. The data gradient's rule is the forward's with the
    channels swapped, and declines layers padded by more than the kernel spans; the
    filter gradient's is the forward's."""
    from types import SimpleNamespace

    from dlc.backends.llvm.conv import _winograd_data_rule, _winograd_filter_rule, _winograd_forward_rule

    def forward(N, C, O, OW, k=3, stride=1, w=16, dilation=(1, 1)):
        t = _forward_template(N, C, O, OW, k, stride)
        t.attrs["dilation"] = dilation
        return _winograd_forward_rule(t, _vector_target(w))

    assert forward(64, 32, 32, 32) == 4 and forward(64, 32, 32, 16) == 4 and forward(64, 256, 256, 8) == 2
    assert forward(64, 32, 32, 13) == 4 and forward(64, 32, 32, 12) == 2  # 16 and 9 tiles of 4x4
    assert forward(64, 32, 32, 32, dilation=(2, 2)) == 4 and forward(64, 32, 32, 32, dilation=(4, 4)) == 4
    assert forward(64, 128, 128, 4) == 0                                  # 4 tiles of 2x2
    assert forward(64, 16, 16, 32) == 0 and forward(64, 48, 40, 32) == 0  # 16 channels; 40 not whole vectors
    assert forward(64, 512, 64, 16) == 0                                  # two K blocks
    assert forward(64, 32, 32, 32, k=5) == 0 and forward(64, 32, 32, 32, stride=2) == 0
    assert forward(31, 32, 32, 32) == 0 and forward(64, 32, 32, 32, w=8) == 4 and forward(64, 32, 32, 32, w=4) == 0

    def data(N, O, C, OW, pad=1):
        g = SimpleNamespace(shape=(N, O, OW, OW))
        return _winograd_data_rule(SimpleNamespace(inputs=[g, SimpleNamespace(shape=(O, C, 3, 3))],
                                                   output=SimpleNamespace(shape=(N, C, OW, OW)),
                                                   attrs={"stride": (1, 1), "pad": (pad, pad)}), _vector_target(16))

    assert data(64, 64, 32, 8) == 2 and data(64, 64, 16, 16) == 0 and data(64, 32, 32, 32, pad=3) == 0

    def dw(N, C, O, OW, stride=1):
        t = _filter_template(C, O, OW, 3, stride, N)
        t.attrs["pad"] = (1, 1)
        return _winograd_filter_rule(t, _vector_target(16))

    assert dw(64, 32, 64, 16) == 4 and dw(32, 64, 64, 8) == 2 and dw(64, 16, 32, 32) == 0
    assert dw(64, 32, 32, 32, stride=2) == 0 and dw(16, 32, 32, 32) == 0


def test_strided_data_gradients_onto_whole_vectors_of_channels_run_directly():
    """With AVX-512: a stride other than 1, a kernel larger than 1x1, input channels a
    multiple of 16 and a batch of at least 32 (split by images) -- 16 positions a tile;
    else the products per phase."""
    from types import SimpleNamespace

    from dlc.backends.llvm.conv import _strided_data_positions

    def positions(N, C, k=3, stride=2, w=16):
        return _strided_data_positions(SimpleNamespace(output=SimpleNamespace(shape=(N, C, 32, 32)),
                                                       inputs=[None, SimpleNamespace(shape=(32, C, k, k))],
                                                       attrs={"stride": (stride, stride)}), _vector_target(w))

    assert positions(64, 16) == 16 and positions(64, 32) == 16 and positions(32, 16, k=2, stride=3) == 16
    assert positions(64, 16, stride=1) == 0 and positions(64, 16, k=1) == 0
    assert positions(64, 24) == 0 and positions(64, 6) == 0
    assert positions(31, 16) == 0 and positions(64, 16, w=8) == 0


def test_a_data_gradient_much_larger_than_g_is_scattered(monkeypatch):
    """An input plane at least 1.5x g's (unpadded 5x5 and 7x7 layers) takes its data
    gradient as w^T g and col2im, on 1, 2 and 3 threads: the op table's rows match the
    reference (and took that path). With AVX-512 the col2im of planes with rows of one
    vector (the first two rows') is written out tap by tap, of the last row's 24-wide
    planes a loop (with AVX2, every row's). The last two rows' planes of g (10x10, 18x18)
    are not whole vectors: their product reads g from rows padded to whole vectors, copied
    once per image (on 3 threads a thread's first item is a later channel of an image,
    and copies it too)."""
    from dlc.backends.llvm.conv import _col2im_unrolled
    rows = [c for c in ALL if c.id and c.id.startswith("t-col2im")]
    assert len(rows) == 3
    assert _col2im_unrolled(12, 12, 7, 7, 16) and _col2im_unrolled(14, 14, 5, 5, 16)
    assert not _col2im_unrolled(24, 24, 7, 7, 16) and not _col2im_unrolled(14, 14, 5, 5, 8)
    assert not _col2im_unrolled(16, 16, 9, 9, 16)  # 1296 loads
    _rows_match_on_path(monkeypatch, "_bwd_data_col2im", rows, "col2im", (1, 2, 3))


def test_a_scattered_data_gradient_takes_one_channel_an_item_in_tiles_of_its_taps():
    """With AVX-512, the products of a scattered data gradient take one input channel an
    item, in register tiles whose rows divide its taps: the fewest loads per
    multiply-add within 21 accumulators (LeNet's 25 taps: 5 x 4; 49: 7 x 3; a 3x3 kernel
    over 3 vectors of positions: 3 x 3). Taps with no such divisor (1x11), and AVX2,
    keep groups of channels in the GEMM's tiles."""
    from dlc.backends.llvm.conv import _col2im_plan, _col2im_tile
    assert _col2im_plan(6, 25, 100, 16, 16) == (5, 4, 1)
    assert _col2im_plan(2, 49, 324, 3, 16) == (7, 3, 1)
    assert _col2im_plan(4, 9, 36, 8, 16) == (3, 3, 1)
    assert _col2im_plan(4, 11, 60, 8, 16) == (*_col2im_tile(44, 60, 8, 11, 16), _col2im_tile(44, 60, 8, 11, 16)[0])
    assert _col2im_plan(6, 25, 100, 16, 8) == (*_col2im_tile(150, 100, 16, 25, 8), _col2im_tile(150, 100, 16, 25, 8)[0])


def test_a_large_batch_is_split_over_images_for_any_thread_count():
    """From 32 images on, a convolution's threads split the batch without a run-time
    choice of rows instead: right on one thread, on three and on more threads than
    half the images (where the run-time test would have chosen rows)."""
    rows = [c for c in ALL if c.id == "t-batch33-by-images"]
    assert len(rows) == 2
    merged, feeds, tols = op_table_graph(rows, salt="images")
    expected = run_graph(merged, feeds)
    for threads in (1, 3, 20):
        check_op_table(expected, run_cpu(merged, feeds, threads), tols)


def op_table_graph(rows, salt: str):
    """The rows merged into one graph (row i's names prefixed `r{i}.`), its float32 feeds,
    and each prefix's (row name, float32 tolerances). Differentiable rows carry their gradients."""
    graphs, feeds, tols = [], {}, {}
    for case in rows:
        built = _grad_graph(case) if case.grad == "fd" else Built(case, salt=salt)
        g = autodiff(built.graph) if case.grad == "fd" else built.graph
        i = len(graphs)
        graphs.append(g)
        for k, v in built.feeds.items():
            feeds[f"r{i}.{k}"] = in_precision(v, np.float32)
        tols[f"r{i}."] = (case.name, case.tol32)
    merged = merge(graphs)
    merged.verify()
    return merged, feeds, tols


def check_op_table(expected: dict, actual: dict, tols: dict) -> None:
    """A backend's results of op_table_graph against the reference interpreter's; gradients
    sum many terms, so float results get ten times the row's forward tolerance."""
    for key, want in expected.items():
        prefix = key.split(".", 1)[0].replace("update:", "") + "."
        name, (rtol, atol) = tols[prefix]
        got = actual[key]
        assert got.shape == want.shape, f"{name}: {key} shape"
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=max(rtol, 2e-5) * 10, atol=max(atol, 1e-6) * 10,
                                       err_msg=f"{name}: {key}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m, n, k", [(7, 9, 3), (7, 9, 40), (70, 80, 200)])
def test_stacked_products_and_their_epilogues_match_on_any_thread_count(ta, tb, m, n, k):
    """batch_matmul's template (the matrices shared out between threads; small ones in
    register rows, a transposed B transposed into scratch, large ones (70 x 80 x 200) by
    the GEMM function on one thread) with an elementwise epilogue run on each matrix:
    every flag, an odd number of matrices for 1 to 3 threads."""
    from dlc.backends.llvm.templates import uses_gemm
    from dlc.core.builder import GraphBuilder
    from dlc.core.kernel import Template
    from dlc.core.types import DType, TensorType
    assert uses_gemm(m, n, k) == (k == 200)
    g, stacks = Graph("stacks"), 5
    b = GraphBuilder(g)
    x = b.input("a", TensorType(DType.f32, (stacks,) + ((k, m) if ta else (m, k))), "data")
    y = b.input("b", TensorType(DType.f32, (stacks,) + ((n, k) if tb else (k, n))), "data")
    c = b.input("c", TensorType(DType.f32, (stacks, m, n)), "data")
    g.outputs["output"] = b.tanh(b.batch_matmul(x, y, ta=ta, tb=tb) * 0.5 + c).id
    rng = np.random.default_rng(k)
    feeds = {name: rng.standard_normal(g.node(g.inputs()[i]).attrs["type"].shape).astype(np.float32)
             for i, name in enumerate(("a", "b", "c"))}
    program = kernel_program(lower(g, 1), CPU.templates)
    parts = [p for kern in program.kernels for p in kern.parts if isinstance(p, Template)]
    assert [(p.op, p.epilogue is not None) for p in parts] == [("batch_matmul", True)]
    want = run_graph(g, feeds)["output"]
    for threads in (1, 2, 3):
        np.testing.assert_allclose(run_cpu(g, feeds, threads)["output"], want, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{threads} threads")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[] if p.stem in ("digits_mlp", "lenet5")
                                               else [pytest.mark.slow]) for p in EXAMPLES])
def test_example_training_steps_match_reference(path, tmp_path):
    """The first steps of training on cpu and on the reference agree (batch 13: no vector
    width divides it)."""
    _steps_match_reference(example_models.load(path), 13, {"cache_dir": tmp_path}, (2e-4, 1e-5), (2e-3, 1e-4),
                           path.stem)


def _steps_match_reference(m, batch: int, options: dict, step_tol: tuple, state_tol: tuple, what: str) -> None:
    """Three training steps of m on cpu and on the reference, from the same weights: their
    outputs within step_tol (rtol, atol), the weights and state after them within state_tol."""
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    ref_state = {k: v.copy() for k, v in m.state.items()}
    cpu_state = {k: v.copy() for k, v in m.state.items()}
    ref = make_program("reference", graph, ref_state)
    cpu = make_program("cpu", graph, cpu_state, options=options)
    rng = np.random.default_rng(0)
    for step in range(3):
        feeds = _example_feeds(m, batch, rng)
        a, b = ref.run(feeds), cpu.run(feeds)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], *step_tol, err_msg=f"{what} step {step}: {k}")
    for k in ref_state:
        np.testing.assert_allclose(cpu_state[k], ref_state[k], *state_tol, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_op_of_every_example_lowers_to_llvm(path):
    """No numpy or Python computes inside a compiled step: every node of the training and
    evaluation graphs is in a kernel rendered as LLVM IR, and the module verifies."""
    import llvmlite.binding as llvm
    m = example_models.load(path)
    for mode in ("train", "eval"):
        graph = m.compile_graph(mode, m.train_config)
        lowered = lower(graph, 8)
        mb = ModuleBuilder(kernel_program(lowered, CPU.templates), CPU.target({"threads": 2}))
        mb.build()
        plan = lowered.meta["fusion"]
        free = plan.free
        for nid in lowered.ids():
            n = lowered.node(nid)
            assert n.op is ops.INPUT or nid in plan.group_of or free(nid), f"{n.op.name} is in no kernel"
        llvm.parse_assembly(str(mb.module)).verify()
        assert [f.name for f in mb.module.functions if f.name == "dlc_step"]


def test_threads_agree(tmp_path):
    m = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln")
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    results = []
    for threads in (1, 2):
        state = {k: v.copy() for k, v in m.state.items()}
        p = make_program("cpu", graph, state, options={"threads": threads, "cache_dir": tmp_path})
        feeds = _example_feeds(m, 64, np.random.default_rng(1))
        results.append((p.run(feeds), state))
    (a, sa), (b, sb) = results
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_compile_cache_hits_and_rebuilds_a_corrupt_entry(tmp_path):
    m = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln")
    graph = m.compile_graph("eval", m.train_config)
    said = []

    def program():
        return make_program("cpu", graph, {}, options={"cache_dir": tmp_path, "verbose": said.append})
    obj1, layout1 = program().compiled(5)
    obj2, layout2 = program().compiled(5)
    assert "miss" in said[0] and "hit" in said[1] and obj1 == obj2
    entry = next(tmp_path.rglob("*.obj"))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    p = program()
    obj3, layout3 = p.compiled(5)
    assert "damaged (checksum mismatch)" in said[2] and "miss" in said[3]  # rebuilt, not loaded
    assert p.cache.get(next(iter([p.stem for p in tmp_path.rglob("*.obj")])))  # and stored again, intact
    CPU.load(obj3, layout3, p.target)  # the rebuilt code loads


def _dlc(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "dlc", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **(env or {})), timeout=600)


def test_artifact_runs_without_compiling_and_refuses_other_cpus(tmp_path):
    env = {"DLC_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "mlp.dlcx"
    r = _dlc("compile", str(EXAMPLES[0].parent / "digits_mlp.dln"), "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    r = _dlc("run", str(out), "--epochs", "1", "--quiet", "--verbose", env=dict(env, DLC_CACHE_DIR=str(tmp_path / "empty")))
    assert r.returncode == 0, r.stderr
    assert "compile cache" not in r.stderr  # every step came from the artifact
    assert "accuracy" in r.stdout
    # another CPU: the manifest says so, and the file is refused with a clear message
    import json
    import zipfile
    tampered = tmp_path / "other.dlcx"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "manifest.json":
                manifest = json.loads(data)
                manifest["target"]["cpu"] = "some-other-cpu"
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    r = _dlc("run", str(tampered), "--epochs", "1", env=env)
    assert r.returncode == 1 and "compiled for a some-other-cpu CPU" in r.stderr and "Traceback" not in r.stderr
    damaged = tmp_path / "damaged.dlcx"
    damaged.write_bytes(out.read_bytes()[:200])
    r = _dlc("run", str(damaged), env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_an_artifact_holds_the_batch_size_asked_for(tmp_path):
    """`dlc compile --batch N -o OUT` writes the steps for N beside the train block's batch
    size (--batch was once ignored there), and a run at batch N loads them."""
    env = {"DLC_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "mlp.dlcx"
    r = _dlc("compile", str(EXAMPLES[0].parent / "digits_mlp.dln"), "--batch", "8", "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    batch = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln").train_config.batch
    assert set(artifact.read(out)[1]) == {8, batch} and "batch 8" in r.stdout
    r = _dlc("run", str(out), "--epochs", "1", "--batch", "8", "--quiet", "--verbose",
             env=dict(env, DLC_CACHE_DIR=str(tmp_path / "empty")))
    assert r.returncode == 0, r.stderr
    assert "compile cache" not in r.stderr  # every step came from the artifact


def test_an_artifact_run_with_another_recipe_compiles_that_recipe(tmp_path):
    """An artifact holds the steps of its train block's recipe. `--optimizer` (or
    `--check-numerics`) changes the step, so the run compiles its own instead of running the
    artifact's SGD step as Adam's (which trained with SGD, and raised a KeyError traceback
    once a loss was not finite)."""
    m = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln")
    path = tmp_path / "a.dlcx"
    m.compile_artifact(path, cache_dir=tmp_path)
    x = np.random.default_rng(0).random((m.train_config.batch, 64), dtype=np.float32)
    y = np.zeros(m.train_config.batch, np.int32)
    for recipe, origin in (({}, "artifact"), ({"optimizer": "sgd(lr=0.1, momentum=0.9)"}, "compiled"),
                           ({"check_numerics": True}, "compiled")):
        art = dlc.load(path)
        art.train_config = dataclasses.replace(art.train_config, **recipe) if "check_numerics" in recipe \
            else override_config(art.train_config, **recipe)
        session = art.session(art.train_config, "cpu", cache_dir=tmp_path / "empty")
        session.use_batch(len(x))
        assert session.warm_up()[0] == origin
        session.train_step(x, y, 0.1)
        assert any(k.endswith(":momentum") for k in art.state) == ("optimizer" in recipe)


def test_artifact_reader_checks_versions(tmp_path, monkeypatch):
    m = dlc.load(EXAMPLES[0].parent / "digits_mlp.dln")
    path = tmp_path / "a.dlcx"
    m.compile_artifact(path, cache_dir=tmp_path)
    manifest, steps = artifact.read(path)
    assert set(steps) == {m.train_config.batch} and manifest["backend"] == "cpu"
    assert set(steps[m.train_config.batch][1].entries) == {"train", "eval"}  # one program, two entries
    monkeypatch.setattr(artifact, "__version__", "99.0")
    with pytest.raises(dlc.DlcError, match="built by dlc"):
        artifact.read(path)


def test_a_compile_runs_with_the_cycle_collector_paused(monkeypatch):
    """Python's cycle collector is off while a step compiles (its collections over the
    objects a build allocates were 40% of building the LLVM IR), on again afterwards, and
    left off when the caller had turned it off."""
    import gc
    from dlc.backends.llvm import CpuBackend
    seen = []
    real = CpuBackend._compile

    def spy(self, *args):
        seen.append(gc.isenabled())
        return real(self, *args)
    monkeypatch.setattr(CpuBackend, "_compile", spy)
    m = dlc.load(example_models.ROOT / "examples" / "perceptron.dln")
    assert gc.isenabled()
    m.session(m.train_config, "cpu", no_cache=True).program.compiled(4)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        m.session(m.train_config, "cpu", no_cache=True).program.compiled(4)
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


WIDE_DENSE = """model m(x: f32[B, 256]) -> f32[B, 10] {
    return dense(relu(dense(x, 256)), 10)
}
train m {
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = sgd(lr=0.1)
    batch = 64
}"""


def test_only_the_modules_holding_a_gemm_get_loop_strength_reduction():
    """LLVM's loop strength reduction costs a tenth of LLVM's time and speeds up only the
    GEMMs: the modules that hold one are compiled with it, the others without. The
    switch changes a GEMM's machine code, and LLVM's default is back after each module."""
    from dlc.backends.llvm import jit
    m = dlc.load(WIDE_DENSE)
    target = CPU.target({})
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 64), CPU.templates)
                for mode in ("train", "eval")}
    mb = ModuleBuilder(programs, target)
    mb.build()
    gemms = {info.name for info in mb.gemms.values()}
    holding = {i for i, module in enumerate(mb.modules)
               if any(f.name in gemms and not f.is_declaration for f in module.functions)}
    assert gemms and mb.lsr == holding and len(mb.modules) > len(holding)

    def assembly(lsr: bool | None) -> str:
        llmod, tm, _ = jit._optimized(mb.modules[min(holding)], target)
        return tm.emit_assembly(llmod) if lsr is None else jit._machine_code(tm.emit_assembly, llmod, lsr)
    with_lsr, without = assembly(True), assembly(False)
    assert with_lsr != without
    assert assembly(None) == with_lsr
    compiled = [jit.compile_modules([mb.modules[min(holding)]], target, workers=1, lsr=lsr).objects
                for lsr in (frozenset({0}), frozenset())]
    assert compiled[0] != compiled[1]


# 9x9 planes (81 positions: 5 vectors of 16 or 10 of 8, and one more lane): the first
# convolution's forward has a ReLU in its epilogue, the second's data gradient the
# ReLU's gradient
CONV_EPILOGUE = """model m(x: f32[B, 2, 11, 11]) -> f32[B, 3] {
    h = x |> conv2d(5, 3) |> relu |> conv2d(4, 3, pad=1) |> tanh
    return h |> flatten |> dense(3)
}
train m {
    data = arrays()
    loss = mse(output, label)
    optimizer = adam(lr=0.01)
    batch = 6
}"""


@pytest.mark.parametrize("example, pretuned_kinds, o3_kinds", [
    ("resnet_bn", {"conv", "nest"}, {"other"}),
    ("char_lm", {"nest"}, {"scalar nest", "other"}),
])
def test_pretuned_kernels_get_modules_of_their_own_and_a_shorter_pipeline(example, pretuned_kinds, o3_kinds):
    """The parts whose emitters vectorize and unroll their code (the convolutions, and
    the loop nests that are not light and have no loop the emitter leaves scalar) are in
    modules of their own, which LLVM compiles with PRETUNED_PASSES; every other module
    (the character model's nests with a scalar loop among them) with O3."""
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.codegen import is_light
    from dlc.backends.llvm.templates import PRETUNED_TEMPLATES
    from dlc.core.kernel import Loop, Template
    m = dlc.load(next(p for p in EXAMPLES if p.stem == example))
    target = CPU.target({})
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 16), CPU.templates)
                for mode in ("train", "eval")}
    mb = ModuleBuilder(programs, target)
    mb.build()
    parts = {}  # function name -> its kernel part

    def collect(entry, kernels):
        for k in kernels:
            if isinstance(k, Loop):
                collect(entry, k.body)
                continue
            for j, part in enumerate(k.parts):
                parts[f"{entry}.{k.name}.{j}.{mb.tag}"] = part
    for entry, program in programs.items():
        collect(entry, program.kernels)

    def vectorized(nest) -> bool:  # whether the emitter leaves none of its loops scalar
        return _pretuned_nest(nest, target)[1].scalar_loops == 0

    def kind(part) -> str:
        if isinstance(part, Template):
            return "conv" if part.op in PRETUNED_TEMPLATES else "other"
        if is_light(part):
            return "other"
        return "nest" if vectorized(part) else "scalar nest"

    def kinds(modules):  # what the modules' kernel functions are
        return {kind(parts[f.name]) for i in modules for f in mb.modules[i].functions
                if not f.is_declaration and f.name in parts}
    assert kinds(mb.pretuned) == pretuned_kinds
    assert kinds(set(range(len(mb.modules))) - mb.pretuned) == o3_kinds
    used = []  # (the functions a module defines, its pipeline)
    real = dict(jit.PIPELINES)

    def defined(module) -> frozenset:
        return frozenset(f.name for f in module.functions if not f.is_declaration)
    for name, run in real.items():
        jit.PIPELINES[name] = lambda llmod, tm, name=name, run=run: (used.append((defined(llmod), name)),
                                                                     run(llmod, tm))
    try:
        jit.compile_modules(mb.modules, target, workers=1, lsr=mb.lsr, pretuned=mb.pretuned)
    finally:
        jit.PIPELINES.update(real)
    assert dict(used) == {defined(module): "pretuned" if i in mb.pretuned else "O3"
                          for i, module in enumerate(mb.modules)}


@pytest.mark.parametrize("example, batch, convolutions", [("resnet_bn", 16, True), ("lenet5", 32, True),
                                                         ("char_lm", 16, False)])
def test_the_o3_modules_are_handed_over_whole_before_the_pretuned_parts_are_built(example, batch, convolutions):
    """ModuleBuilder.build(finished): where convolutions are left to build, the modules for
    O3 are handed over (to be compiled while the rest is built) once every part that goes
    there is built and before any pretuned part is; nothing is added to them afterwards
    (LeNet-5's nests built again for O3 at batch 32 go to the step module, which stays
    open). The GEMM modules among them are named for loop strength reduction, none for the
    pretuned pipeline. Without convolutions (the character model) nothing is handed over."""
    from dlc.backends.llvm.codegen import _pretuned
    from dlc.core.kernel import Loop
    m = dlc.load(next(p for p in EXAMPLES if p.stem == example))
    target = CPU.target({})
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), batch), CPU.templates)
                for mode in ("train", "eval")}
    mb = ModuleBuilder(programs, target)
    pretuned_parts = set()

    def collect(entry, kernels):
        for k in kernels:
            if isinstance(k, Loop):
                collect(entry, k.body)
                continue
            pretuned_parts.update(f"{entry}.{k.name}.{j}.{mb.tag}" for j, part in enumerate(k.parts)
                                  if _pretuned(part))
    for entry, program in programs.items():
        collect(entry, program.kernels)
    handed = []

    def finished(modules, sizes, pretuned, lsr):
        built = {f.name for module in mb.modules for f in module.functions if not f.is_declaration}
        assert pretuned_parts and not built & pretuned_parts
        handed.append((modules, [str(module) for module in modules], pretuned, lsr))
    mb.build(finished)
    if not convolutions:
        assert pretuned_parts and not handed
        return
    ((modules, texts, pretuned, lsr),) = handed
    assert modules and mb.modules[0] is mb.step_module and mb.step_module not in modules
    assert [str(module) for module in modules] == texts
    positions = [next(i for i, m in enumerate(mb.modules) if m is module) for module in modules]
    assert not pretuned and not mb.pretuned & set(positions)
    assert lsr == {j for j, i in enumerate(positions) if i in mb.lsr}


def test_a_convolutions_epilogue_is_vectorized_and_matches_the_reference(tmp_path, monkeypatch):
    """A convolution's epilogue (CONV_EPILOGUE: forward and data gradient) runs W lanes at
    a time, its last vector masked: the training steps match the reference interpreter's
    on planes that no vector width divides."""
    from dlc.backends.llvm import emit
    vectorized = []
    real = emit.Emitter.lane_stores

    def counted(self, stores, var, i, w, live=None):
        vectorized.append((w, live))
        return real(self, stores, var, i, w, live)
    monkeypatch.setattr(emit.Emitter, "lane_stores", counted)
    _compiled_here(monkeypatch)
    _steps_match_reference(dlc.load(CONV_EPILOGUE), 6, {"no_cache": True}, (2e-5, 1e-6), (2e-5, 1e-6), "CONV_EPILOGUE")
    assert any(live is not None for _, live in vectorized) and any(live is None for _, live in vectorized)


def test_stores_are_vectorized_only_where_no_lane_reads_another_lanes_store():
    """Emitter.store_lanes: a loop of float stores to consecutive elements runs W lanes at
    a time, also where it updates a buffer in place; not where an iteration reads an
    element that another one stores (in order, x[i] = x[i - 1] + 1 reads the value just
    stored), stores an integer, gathers (a stride past MAX_STRIDE), or uses a clamped
    index of the loop's variable as a value (a divided one is computed as vectors)."""
    from llvmlite import ir
    from dlc.backends.llvm.emit import MAX_STRIDE, Emitter
    from dlc.backends.llvm.irutil import PTR, VOID, set_target
    from dlc.backends.llvm.target import Target
    from dlc.core.kernel import Buffer, Exprs, Store
    from dlc.core.types import DType
    target = Target.host(1)
    if target.vector_width == 1:
        pytest.skip("no vector unit on this machine")
    x = Buffer("x", DType.f32, (64,), "arena")
    y = Buffer("y", DType.f32, (64,), "arena")
    k = Buffer("k", DType.i32, (64,), "arena")
    e = Exprs()
    i = e.var("i", 63)
    one = e.lit(1.0, DType.f32)

    def lanes(*stores) -> int:
        fn = ir.Function(ir.Module(), ir.FunctionType(VOID, [PTR] * 3), name="f")
        set_target(fn, target, target.vector_width)
        em = Emitter(ir.IRBuilder(fn.append_basic_block()), dict(zip("xyk", fn.args)))
        return em.store_lanes(list(stores), i, 63)
    shifted = e.add(i, e.const(1))
    w = target.vector_width
    assert lanes(Store(y, i, e.op("add", (e.load(x, shifted), one), DType.f32))) == w
    assert lanes(Store(x, i, e.op("mul", (e.load(x, i), e.load(y, i)), DType.f32))) == w  # in place
    assert lanes(Store(x, shifted, e.op("add", (e.load(x, i), one), DType.f32))) == 1
    assert lanes(Store(k, i, e.lit(1, DType.i32))) == 1
    assert lanes(Store(y, i, e.load(x, e.mul(i, 2)))) == w  # every other element (a stride)
    assert lanes(Store(y, i, e.load(x, e.mul(i, MAX_STRIDE + 1)))) == 1
    assert lanes(Store(y, i, e.index(i, DType.f32))) == w
    assert lanes(Store(y, i, e.index(e.div(i, 7), DType.f32))) == w  # (lane indices computed as vectors)
    assert lanes(Store(y, i, e.index(e.clamp(i, 0, 5), DType.f32))) == 1  # (left to scalar code)
    assert lanes(Store(y, i, e.load(x, e.clamp(e.add(i, e.const(-2)), 0, 60)))) == w  # (a padded axis)
    assert lanes(Store(y, i, e.load(x, e.mul(e.clamp(i, 0, 15), 2)))) == w  # (a strided layer's padding)
    assert lanes(Store(k, i, e.load(k, e.mul(i, 2)))) == 1


@pytest.mark.parametrize("count", [1, 2, 3, 5, 24])
def test_hsums_gives_each_vectors_hsum_bit_for_bit(count):
    """irutil.hsums (the lane sums of several vectors, halves of two vectors sharing an
    add) returns for each vector exactly what hsum does, at the host's vector width and
    at 8, on values whose sums depend on the order of the adds."""
    import ctypes
    from llvmlite import ir
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.irutil import F32, PTR, VOID, gep, hsum, hsums, set_target
    from dlc.backends.llvm.target import Target
    target = Target.host(1)
    for w in sorted({target.vector_width, 8}):
        module = ir.Module(name="hsums")
        module.triple = target.triple
        fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * 3), name="f")
        set_target(fn, target)
        b = ir.IRBuilder(fn.append_basic_block())
        vectors = [b.load(gep(b, fn.args[0], ir.Constant(ir.IntType(64), i * w), F32), typ=ir.VectorType(F32, w),
                          align=4) for i in range(count)]
        for out, sums in zip(fn.args[1:], (hsums(b, vectors), [hsum(b, v) for v in vectors])):
            for i, x in enumerate(sums):
                b.store(x, gep(b, out, ir.Constant(ir.IntType(64), i), F32))
        b.ret_void()
        engine = jit.Engine(jit.compile_modules([module], target, workers=1).objects, target)
        x = (np.random.default_rng(count).standard_normal(count * w) * 10.0 ** (np.arange(count * w) % 7)).astype(np.float32)
        got, want = np.full(count, np.nan, np.float32), np.full(count, np.nan, np.float32)
        ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 3)(engine.address("f"))(
            x.ctypes.data, got.ctypes.data, want.ctypes.data)
        assert got.tobytes() == want.tobytes()
        np.testing.assert_allclose(got, x.reshape(count, w).sum(axis=1, dtype=np.float64), rtol=1e-5, atol=1e-2)


def _row_reads(make, width: int = 32, target=None, length: int = 40):
    """A nest over 3 rows r of x (`width` floats each): out[r, i] = value for i < `length`
    (whole vectors and a masked last one) and sums[r] = the sum over j < length of `term`,
    where (value, term) = make(e, read, i, j) and read(at) loads x[r, at]; built as a
    pretuned module gets it for `target` (the host's when None) and run on random x:
    (its emitter, x, out, sums)."""
    import ctypes
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.codegen import buffers_of
    from dlc.backends.llvm.target import Target
    from dlc.core.kernel import Buffer, Exprs, LoopNest, Store
    from dlc.core.types import DType
    target = target or Target.host(1)
    if target.vector_width == 1:
        pytest.skip("no vector unit on this machine")
    rows = 3
    x = Buffer("x", DType.f32, (rows * width,), "arena")
    out = Buffer("out", DType.f32, (rows * length,), "arena")
    sums = Buffer("sums", DType.f32, (rows,), "arena")
    e = Exprs()
    r, i, j = e.var("r", rows), e.var("i", length), e.var("j", length)
    value, term = make(e, lambda at: e.load(x, e.add(e.mul(r, width), at)), i, j)
    nest = LoopNest((r,), (i,), stores=[Store(out, e.ravel((r, i), (rows, length)), value)],
                    row_stores=[Store(sums, r, e.reduce("sum", (j,), term, DType.f32))])
    fn, em = _pretuned_nest(nest, target)
    engine = jit.Engine(jit.compile_modules([fn.module], target, workers=1, pretuned=frozenset({0})).objects, target)
    run = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 3, ctypes.c_int32, ctypes.c_int32)(engine.address("f"))
    arrays = {"x": np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32),
              "out": np.full((rows, length), np.nan, np.float32), "sums": np.full(rows, np.nan, np.float32)}
    run(*[arrays[buf.name].ctypes.data for buf in buffers_of(nest)], 0, 1)
    return em, arrays["x"], arrays["out"], arrays["sums"]


def test_loads_through_a_clamp_vectorize_and_read_the_clamped_elements():
    """A padded axis's source index, clamp(i + d, lo, hi) (growing by 1 a lane inside
    lo..hi), leaves no loop scalar (Emitter.lane_load): the lanes inside read a vector,
    those outside the element at lo or at hi, in stores and in sums, over whole vectors
    and a masked last one, past either end; numpy's results."""
    from dlc.core.types import DType

    def make(e, read, i, j):
        def shifted(var, d, lo, hi):
            return read(e.clamp(e.add(var, e.const(d)), lo, hi))
        return e.op("add", (shifted(i, -3, 0, 31), shifted(i, -20, 4, 12)), DType.f32), shifted(j, -5, 0, 31)
    em, x, out, sums = _row_reads(make)
    assert em.scalar_loops == 0
    at = np.arange(40)
    np.testing.assert_array_equal(out, x[:, np.clip(at - 3, 0, 31)] + x[:, np.clip(at - 20, 4, 12)])
    np.testing.assert_allclose(sums, x[:, np.clip(at - 5, 0, 31)].sum(axis=1), rtol=1e-5)


def test_loads_through_a_division_vectorize_and_read_each_lanes_element():
    """A strided layer's gradient reads element x // s for position x, maybe through a
    clamp: with 16 lanes (AVX-512) the loop is vectorized (each element loaded once,
    spread over its lanes, for either parity of the first lane; a mask from (x + 1) % 2),
    over whole vectors and a masked last one; with 8 (AVX2) it stays scalar. numpy's
    results either way."""
    from dlc.backends.llvm.target import Target
    from dlc.core.types import DType

    def make(e, read, i, j):
        odd = e.op("eq", (e.index(e.mod(e.add(i, e.const(1)), 2), DType.i32), e.lit(0, DType.i32)), DType.bool)
        halves = e.op("select", (odd, read(e.div(e.add(i, e.const(1)), 2)), e.lit(0.0, DType.f32)), DType.f32)
        thirds = read(e.clamp(e.add(e.div(e.add(i, e.const(2)), 3), e.const(-4)), 0, 7))
        return e.op("add", (halves, thirds), DType.f32), read(e.div(j, 2))
    em, x, out, sums = _row_reads(make)
    assert (em.scalar_loops == 0) == (Target.host(1).vector_width >= 16)
    at = np.arange(40)
    want = np.where((at + 1) % 2 == 0, x[:, (at + 1) // 2], 0) + x[:, np.clip((at + 2) // 3 - 4, 0, 7)]
    np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(sums, x[:, at // 2].sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("length", [40, 35])
@pytest.mark.parametrize("avx2", [False, True], ids=["host", "avx2"])
def test_loads_with_a_stride_vectorize_and_read_every_sth_element(avx2, length):
    """A stride-s layer reads element s*x + c for position x, maybe through a clamp (its
    padded input: s*clamp(x, lo, hi) + c): the loop is vectorized (Emitter._strided_run:
    the run of elements the lanes read loaded as vectors, every s-th element picked by a
    shuffle), for s = 2, 3 and 4, over whole vectors and a last one with some lanes in
    the loop (with 16 lanes 8 or 3, with 8 none or 3; its run covered by loads that end at
    its last element, for 40 the row's last), in stores and in sums; numpy's results, in
    the host's code and in AVX2 code."""
    from dlc.backends.llvm.target import Target
    from dlc.core.types import DType
    target = Target.host(1)
    if avx2:
        if not target.has("avx512f"):
            pytest.skip("the host's code is the AVX2 code")
        target = target.without("avx512")

    def make(e, read, i, j):
        def plus(*xs):
            return e.op("add", xs[:2], DType.f32) if len(xs) == 2 else plus(plus(*xs[:2]), *xs[2:])
        evens = read(e.mul(i, 2))  # 0..78: the row's last element
        thirds = read(e.add(e.mul(e.clamp(e.add(i, e.const(-3)), 0, 20), 3), e.const(1)))
        fourths = read(e.mul(e.clamp(e.add(i, e.const(-20)), 2, 15), 4))
        return plus(evens, thirds, fourths), e.op("mul", (read(e.mul(j, 2)), read(e.mul(e.clamp(e.add(
            j, e.const(-5)), 0, 25), 3))), DType.f32)
    em, x, out, sums = _row_reads(make, width=79, target=target, length=length)
    assert em.scalar_loops == 0
    at = np.arange(length)
    want = x[:, 2 * at] + x[:, 3 * np.clip(at - 3, 0, 20) + 1] + x[:, 4 * np.clip(at - 20, 2, 15)]
    np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(sums, (x[:, 2 * at] * x[:, 3 * np.clip(at - 5, 0, 25)]).sum(axis=1), rtol=1e-5)


def test_loop_invariant_values_are_computed_outside_the_loops_that_do_not_change_them():
    """Emitter.hoist_out_of: in a sum over (r, i) and a store loop over (r2, i2), a
    row's mask (r < n, as a padded batch's statistics have) is computed once per row,
    and splat where it is computed, not in the vectorized innermost loop (the pretuned
    modules get no loop-invariant code motion from LLVM); the results are numpy's."""
    import ctypes
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.codegen import buffers_of
    from dlc.backends.llvm.target import Target
    from dlc.core.kernel import Buffer, Exprs, LoopNest, Store
    from dlc.core.types import DType
    target = Target.host(1)
    rows, cols, width = 5, 3, 40  # 40: whole vectors and a masked last one
    f32 = DType.f32
    x = Buffer("x", f32, (rows * cols * width,), "arena")
    n = Buffer("n", DType.i32, (1,), "arena")
    out = Buffer("out", f32, (cols * rows * width,), "arena")
    e = Exprs()
    c, r, i, r2, i2 = (e.var(name, extent) for name, extent in
                       (("c", cols), ("r", rows), ("i", width), ("r2", rows), ("i2", width)))

    def live(row):
        return e.op("lt", (e.index(row, DType.i32), e.load(n, e.const(0))), DType.bool)

    def masked(row, value):
        return e.op("select", (live(row), value, e.lit(0.0, f32)), f32)
    total = e.reduce("sum", (r, i), masked(r, e.load(x, e.ravel((r, c, i), (rows, cols, width)))), f32)
    scaled = e.op("mul", (e.load(x, e.ravel((r2, c, i2), (rows, cols, width))), total), f32)
    nest = LoopNest((c,), (r2, i2), stores=[Store(out, e.ravel((c, r2, i2), (cols, rows, width)), masked(r2, scaled))])
    fn, _ = _pretuned_nest(nest, target)
    for block in fn.blocks:
        masks = [ins for ins in block.instructions if ins.opname == "icmp" and "i32" in str(ins.operands[0].type)
                 or ins.opname == "shufflevector" and str(ins.type).endswith("x i1>")]
        if block.name.startswith(("r.", "r2.")) and block.name.endswith("body"):
            assert masks, block.name  # a row's mask, and its splat, where the row begins
        elif block.name.startswith(("i.", "i2.")):
            assert not masks, block.name
    engine = jit.Engine(jit.compile_modules([fn.module], target, workers=1, pretuned=frozenset({0})).objects, target)
    run = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 3, ctypes.c_int32, ctypes.c_int32)(engine.address("f"))
    data = np.random.default_rng(0).standard_normal((rows, cols, width)).astype(np.float32)
    for valid in (rows, 3):
        got = np.full((cols, rows, width), np.nan, np.float32)
        count = np.array([valid], np.int32)
        arrays = {"x": data, "n": count, "out": got}
        run(*[arrays[buf.name].ctypes.data for buf in buffers_of(nest)], 0, 1)
        keep = (np.arange(rows) < valid)[:, None, None]
        sums = np.where(keep, data, 0).sum(axis=(0, 2))
        want = np.where(keep, data * sums[None, :, None], 0).transpose(1, 0, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _pretuned_nest(nest, target):
    """nest's function as a pretuned module gets it (the emitter's vectorized stores and
    hoisting on): (the function, in a module of its own; its emitter)."""
    from llvmlite import ir
    from dlc.backends.llvm.codegen import buffers_of
    from dlc.backends.llvm.emit import Emitter, emit_nest
    from dlc.backends.llvm.irutil import I32, PTR, VOID, set_target
    buffers = buffers_of(nest)
    module = ir.Module(name="nest")
    module.triple = target.triple
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * len(buffers) + [I32, I32]), name="f")
    set_target(fn, target)
    em = Emitter(ir.IRBuilder(fn.append_basic_block("entry")), {b.name: a for a, b in zip(fn.args, buffers)})
    em.licm = True
    emit_nest(em, nest, *fn.args[-2:], vectorize=True)
    em.b.ret_void()
    return fn, em


def _numbered_modules(target, count: int) -> list:
    """Modules q0.. each defining `i32 f<i>()` returning i."""
    from llvmlite import ir
    modules = []
    for i in range(count):
        m = ir.Module(name=f"q{i}")
        m.triple = target.triple
        fn = ir.Function(m, ir.FunctionType(ir.IntType(32), []), name=f"f{i}")
        ir.IRBuilder(fn.append_basic_block()).ret(ir.Constant(ir.IntType(32), i))
        modules.append(m)
    return modules


def test_optimized_code_is_built_by_a_forked_process(monkeypatch):
    """BUILD_IN_CHILD: the LLVM IR of a compile is built in a forked process, never in
    this one, and the step it sends back runs; built here when it is off; an error in
    the child's build comes back as what it was, and a child that dies is an error."""
    import signal
    from dlc.backends.llvm import codegen
    from dlc.core.diagnostics import DlcError
    builders = []
    real = codegen.ModuleBuilder.build
    monkeypatch.setattr(codegen.ModuleBuilder, "build", lambda self, *a: builders.append(1) or real(self, *a))
    m = dlc.load(example_models.ROOT / "examples" / "perceptron.dln")
    _steps_match_reference(m, 4, {"no_cache": True}, (2e-5, 1e-6), (2e-5, 1e-6), "perceptron")
    assert builders == []
    _compiled_here(monkeypatch)
    m.session(m.train_config, "cpu", no_cache=True).program.compiled(4)
    assert builders == [1]

    monkeypatch.undo()

    def failing(self, *a):
        raise DlcError("no code for this", hint="try less")
    monkeypatch.setattr(codegen.ModuleBuilder, "build", failing)
    with pytest.raises(DlcError, match="no code for this") as info:
        m.session(m.train_config, "cpu", no_cache=True).program.compiled(4)
    assert info.value.hint == "try less"
    monkeypatch.setattr(codegen.ModuleBuilder, "build", lambda self, *a: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(DlcError, match=r"the compiler process died \(killed by signal 9\)"):
        m.session(m.train_config, "cpu", no_cache=True).program.compiled(4)


MLP784 = example_models.ROOT / "benchmarks" / "models" / "mlp784.dln"


def _trained(staged: bool, monkeypatch) -> tuple[dict, dict]:
    """mlp784's state after three training steps and an evaluation, compiled with the
    training unit's lowering staged or not (program.STAGED_LOWERING)."""
    from dlc import program as program_mod
    monkeypatch.setattr(program_mod, "STAGED_LOWERING", staged)
    m = dlc.load(MLP784)
    session = m.session(m.train_config, "cpu", no_cache=True, threads=2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        feeds = _example_feeds(m, 128, rng)
        session.train_step(feeds["x"], feeds["label"], 0.01)
    metrics = session.evaluate(feeds["x"], feeds["label"], 128)
    return {k: v.copy() for k, v in m.state.items()}, metrics


def test_a_training_unit_compiles_its_evaluation_step_while_its_training_step_is_lowered(monkeypatch, tmp_path):
    """Program._compile lowers the evaluation step first; the forked builder builds its
    modules and hands them over (ModuleBuilder.build_first) while this process still
    lowers the training step (which here waits to see that happen). The code trains and
    evaluates bit for bit as the code built in one go."""
    import time
    from dlc import pipeline
    from dlc.backends.llvm import codegen
    handed = tmp_path / "handed"
    real_first, real_lower = codegen.ModuleBuilder.build_first, pipeline.lower

    def build_first(self, finished):  # (in the forked builder)
        real_first(self, finished)
        handed.write_text(" ".join(entry for entry, program in self.programs.items() if program is not None))
    lowered, seen = [], []

    def lower(graph, batch, **options):
        lowered.append(graph)
        if len(lowered) == 2:  # the training step (the evaluation step is lowered first)
            deadline = time.monotonic() + 20
            while not handed.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(handed.exists() and handed.read_text())
        return real_lower(graph, batch, **options)
    monkeypatch.setattr(codegen.ModuleBuilder, "build_first", build_first)
    monkeypatch.setattr(pipeline, "lower", lower)
    staged = _trained(True, monkeypatch)
    assert seen == ["eval"], "the evaluation step's modules were not handed over while the training step was lowered"
    monkeypatch.setattr(pipeline, "lower", real_lower)
    handed.unlink()
    in_one_go = _trained(False, monkeypatch)
    assert not handed.exists()
    for k in staged[0]:
        np.testing.assert_array_equal(staged[0][k], in_one_go[0][k], err_msg=k)
    assert staged[1] == in_one_go[1]


def test_the_training_steps_matmuls_call_the_gemms_the_evaluation_step_handed_over():
    """build_first builds the evaluation step into a quarter of the modules and closes
    them; the training step's forward matmuls of the same shapes call those GEMMs
    through declarations instead of building second copies, and every function is
    built as often as when the unit is built in one go."""
    m = dlc.load(MLP784)
    target = CPU.target({"threads": 2})
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 128), CPU.templates)
                for mode in ("train", "eval")}

    def definitions(mb):
        return sorted(f.name.rsplit(".", 1)[0] for mod in mb.modules for f in mod.functions
                      if not f.is_declaration and f.name.startswith("gemm."))
    whole = ModuleBuilder(programs, target, tag="t")
    whole.build()
    handed = []
    staged = ModuleBuilder({"train": None, "eval": programs["eval"]}, target, tag="t")
    staged.build_first(lambda modules, *rest: handed.extend(modules))
    assert handed and all(mod is not staged.step_module for mod in handed)
    assert staged.closed == {staged.modules.index(mod) for mod in handed}
    staged.add_programs({"train": programs["train"]})
    staged.build(lambda *a: None)
    assert list(staged.entry_parts) == ["train", "eval"]  # the unit's order, for the layouts
    assert len(definitions(staged)) == len(definitions(whole))
    calls = [f.name for mod in staged.modules if mod not in handed for f in mod.functions
             if f.is_declaration and f.name.startswith("gemm.") and not f.name.endswith("pack_b")]
    defined_there = {f.name for mod in handed for f in mod.functions if not f.is_declaration}
    assert calls and set(calls) <= defined_there


def test_a_unit_whose_lowering_fails_or_does_not_pickle_leaves_no_compiler_behind(monkeypatch):
    """An error while the training step is lowered (here: the step does not fit in memory)
    stops the forked builder, which is collected; programs that cannot be sent to it
    (jit.Unsent) are built in one go instead."""
    from dlc.backends.llvm import jit
    from dlc.core.diagnostics import ResourceError
    spawned = []
    real_spawn = jit._spawn
    monkeypatch.setattr(jit, "_spawn", lambda *a, **k: spawned.append(real_spawn(*a, **k)) or spawned[-1])
    monkeypatch.setattr(CPU, "free_memory", lambda target: 10)
    m = dlc.load(example_models.ROOT / "examples" / "perceptron.dln")
    with pytest.raises(ResourceError, match="only 10 bytes is available"):
        m.session(m.train_config, "cpu", no_cache=True).program.compiled(4)
    assert spawned
    for pid, _ in spawned:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, and collected (a zombie would still take the signal)
    monkeypatch.undo()

    def unsent(write, value):
        os.close(write)
        raise jit.Unsent(value, "cannot pickle this")
    monkeypatch.setattr(jit, "_send", unsent)
    session = m.session(m.train_config, "cpu", no_cache=True)
    feeds = _example_feeds(m, 4, np.random.default_rng(0))
    assert np.isfinite(session.train_step(feeds[m.input_types[0][0]], feeds["label"], 0.01)["loss"])
    assert list(session.program.compiled(4)[1].entries) == ["train", "eval"]


def test_in_child_feeds_the_child_what_this_process_computes_meanwhile():
    """in_child(fn, feed): fn(receive) runs in the child while this process runs feed();
    receive() there returns feed()'s value. A feed that raises stops the child and raises
    here; a value that does not pickle raises Unsent with the value."""
    from dlc.backends.llvm import jit
    assert jit.in_child(lambda receive: ("got", receive(), os.getpid()), lambda: [1, 2])[:2] == ("got", [1, 2])
    assert jit.in_child(lambda receive: receive(), lambda: list(range(100_000)))[-1] == 99_999  # past a pipe's buffer

    def failing():
        raise KeyError("lowering failed")
    with pytest.raises(KeyError, match="lowering failed"):
        jit.in_child(lambda receive: receive(), failing)
    value = lambda: 0  # noqa: E731 - a lambda does not pickle
    with pytest.raises(jit.Unsent) as info:
        jit.in_child(lambda receive: receive(), lambda: value)
    assert info.value.value is value


def test_compiler_processes_take_modules_from_a_queue(monkeypatch):
    """Two processes take five modules largest first; the objects come back in module
    order, and a module that fails in whichever process took it fails the compile with
    its reason (the other process is still collected)."""
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.target import Target
    target = Target.host(2)
    modules = _numbered_modules(target, 5)
    out = jit.compile_modules(modules, target, workers=2, sizes=[1, 5, 2, 4, 3])
    assert _call_each(out.objects, target, 5) == list(range(5))

    real = jit._compile_one

    def failing(module, target, pipeline="O3", lsr=False):
        if module.name == "q3":
            raise ValueError("q3 does not compile")
        return real(module, target, pipeline, lsr)
    monkeypatch.setattr(jit, "_compile_one", failing)
    with pytest.raises(RuntimeError, match="compiling a module failed: .*q3 does not compile"):
        jit.compile_modules(modules, target, workers=2)


def _call_each(objects, target, count: int) -> list:
    """What f0() .. f<count - 1>() return, the objects loaded into one engine."""
    import ctypes
    from dlc.backends.llvm import jit
    engine = jit.Engine(objects, target)
    return [ctypes.CFUNCTYPE(ctypes.c_int32)(engine.address(f"f{i}"))() for i in range(count)]


def test_compiler_processes_start_on_a_batch_while_the_next_is_built(tmp_path, monkeypatch):
    """ModuleCompiler: a batch's modules are taken by a child forked when it is added,
    which starts while the next batch is built. When the next batch is added, a child
    forked for it (with both batches' modules) takes over: the first one stops after the
    module it is on (it does not have the later modules). Objects come back in the order
    added, or in `order`; a batch is the modules not added before."""
    import time
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.elf import symbols
    from dlc.backends.llvm.target import Target
    target = Target.host(2)
    started, added = tmp_path / "q0 started", tmp_path / "batch 2 added"
    real_one, real_collect, real_spawn = jit._compile_one, jit.ModuleCompiler._collect, jit._spawn

    def held(module, target, pipeline="O3", lsr=False):  # q0 waits until the second batch is in
        if module.name == "q0":
            started.touch()
            deadline = time.monotonic() + 20
            while not added.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return real_one(module, target, pipeline, lsr)
    by_child, spawned = [], []

    def collect(self, pid, read):
        before = set(self.results)
        real_collect(self, pid, read)
        by_child.append(set(self.results) - before)
    monkeypatch.setattr(jit, "_compile_one", held)
    monkeypatch.setattr(jit.ModuleCompiler, "_collect", collect)
    monkeypatch.setattr(jit, "_spawn", lambda fn: spawned.append(1) or real_spawn(fn))
    compiler = jit.ModuleCompiler(target, workers=2)
    modules = _numbered_modules(target, 12)
    compiler.add(modules[:6], sizes=[6, 5, 4, 3, 2, 1])  # q0 first
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    compiler.add(modules)  # q6..q11, built after the first child was forked
    added.touch()
    assert len(compiler.jobs) == 12 and len(spawned) == 2
    objects = compiler.finish(order=modules[::-1]).objects
    assert {0} in by_child  # the first child: q0 only
    assert [symbols(obj).defines for obj in objects] == [[f"f{i}"] for i in reversed(range(12))]
    assert _call_each(objects, target, 12) == list(range(12))


def test_a_build_that_fails_stops_the_compiler_processes_it_started():
    """ModuleCompiler.cancel (a build failing after a batch was handed over): its children
    are stopped and collected -- none is left running or unreaped."""
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.target import Target
    target = Target.host(2)
    compiler = jit.ModuleCompiler(target, workers=2)
    compiler.add(_numbered_modules(target, 8))
    pids = [pid for pid, _ in compiler.children]
    assert pids
    compiler.cancel()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


FORK_BESIDE_LLVM = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from llvmlite.binding import ffi
from test_backend_cpu import _numbered_modules
from dlc.backends.llvm import jit
from dlc.backends.llvm.target import Target
target = Target.host(2)
modules = _numbered_modules(target, 4)
held, release = threading.Event(), threading.Event()
def hold():  # another thread inside llvmlite while the compile forks
    with ffi.lib._lock:
        held.set()
        release.wait()
threading.Thread(target=hold).start()
held.wait()
threading.Timer(0.3, release.set).start()
print(len(jit.compile_modules(modules, target, workers=2).objects))
"""


def test_a_compile_forks_only_when_no_other_thread_is_inside_llvm():
    """A compile whose workers fork while another thread of the process holds llvmlite's
    lock (fit compiles on a thread of its own) waits for the lock before it forks: a child
    forked then would inherit the lock held by a thread it does not have, and wait for it
    forever (a test run hung so)."""
    from pathlib import Path
    here = str(Path(__file__).resolve().parent)
    r = subprocess.run([sys.executable, "-c", FORK_BESIDE_LLVM, here], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(here).parent)})
    assert r.returncode == 0 and r.stdout.split() == ["4"], r.stderr


@pytest.mark.parametrize("isa", ["host", "avx2"])
def test_training_and_evaluation_share_their_forward_convolutions(isa):
    """LeNet-5's two convolutions (with their bias + ReLU epilogues) are the same code in
    the training and the evaluation step: built once, both steps call one function. Also
    where the two land in modules that number their metadata differently (with AVX2 the
    convolutions' GEMM branches carry branch weights: the loop IDs were !1 in one module
    and !2 in the other, and each step built its own)."""
    m = example_models.load(EXAMPLES[0].parent / "lenet5.dln")
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 8), CPU.templates)
                for mode in ("train", "eval")}
    target = CPU.target({"threads": 2})
    mb = ModuleBuilder(programs, target if isa == "host" else target.without("avx512"))
    mb.build()
    convs = {entry: [fn for _, name, fn, _ in parts if name.endswith("_conv")][:2]
             for entry, parts in mb.entry_parts.items()}
    assert len(convs["eval"]) == 2 and convs["train"] == convs["eval"]


def test_functions_are_compared_with_their_metadata_written_out():
    """Two functions are the same code when their text and the metadata it refers to are
    the same, whatever numbers their modules gave the metadata; branch weights that
    differ keep them apart."""
    from llvmlite import ir

    from dlc.backends.llvm.codegen import _body

    def function(weights, before: int):
        module = ir.Module()
        for i in range(before):  # metadata numbered ahead of the function's
            module.add_metadata([ir.MetaDataString(module, f"other{i}")])
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.IntType(1)]), name=f"f{before}")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        yes, no = fn.append_basic_block("yes"), fn.append_basic_block("no")
        b.cbranch(fn.args[0], yes, no).set_weights(weights)
        for block in (yes, no):
            b.position_at_end(block)
            b.ret_void()
        return fn

    assert "!0" in str(function([1, 9], 0)) and "!2" in str(function([1, 9], 2))
    assert _body(function([1, 9], 0)) == _body(function([1, 9], 2))
    assert _body(function([1, 9], 0)) != _body(function([9, 1], 2))


def test_layers_of_one_shape_share_their_functions_however_many():
    """A deep stack of identical layers compiles to the functions of one: two layers' code
    differs only in the names the kernel IR gave their loop variables, which _body numbers
    anew (before, a 100-layer MLP built 413 distinct functions and took 6.8 s to compile,
    3.7 s after)."""
    def distinct(depth: int) -> int:
        text = ("model m(x: f32[B, 16]) -> f32[B, 4] {\n    h = x |> dense(32) |> relu\n"
                + "    h = h |> dense(32) |> relu\n" * depth + "    return dense(h, 4)\n}\n"
                "train m { data = arrays()  loss = cross_entropy(output, label)  optimizer = adam() }\n")
        m = dlc.load(text)
        programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 8), CPU.templates)
                    for mode in ("train", "eval")}
        mb = ModuleBuilder(programs, CPU.target({"threads": 2}))
        mb.build()
        return len({id(fn) for parts in mb.entry_parts.values() for _, _, fn, _ in parts if fn is not None})

    assert distinct(8) == distinct(3)


def test_each_module_is_sized_with_the_helpers_its_kernels_built():
    """The modules' sizes (by which the compiler processes take them, largest first) count
    every function a kernel part put there: its own (unless an identical one existed) and
    the convolution packers and GEMMs it built, which are most of a CNN's code."""
    m = example_models.load(EXAMPLES[0].parent / "lenet5.dln")
    programs = {mode: kernel_program(lower(m.compile_graph(mode, m.train_config), 8), CPU.templates)
                for mode in ("train", "eval")}
    mb = ModuleBuilder(programs, CPU.target({"threads": 2}))
    mb.build()
    steps = {"dlc_scratch", "dlc_barrier"} | {mb.symbol(entry) for entry in programs}
    helpers = [f for m in mb.modules for f in m.functions if not f.is_declaration and f.name.startswith("im2col")]
    assert helpers and mb.shared
    for module, size in zip(mb.modules, mb.sizes):
        assert size == sum(len(blk.instructions) for f in module.functions if f.name not in steps
                           for blk in f.blocks)


def _resnet_bn_step_built_twice(tmp_path, change):
    """resnet_bn's training step at batch 13, built and run as the code is and again after
    change() (a monkeypatch): for each, the loops in the functions of its loop-nest
    kernels, its outputs and its updated state."""
    from dlc.core.kernel import LoopNest, all_kernels
    m = example_models.load(EXAMPLES[0].parent / "resnet_bn.dln")
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    feeds = _example_feeds(m, 13, np.random.default_rng(0))

    def build_and_run(tag):
        program = kernel_program(lower(graph, 13), CPU.templates)
        nests = {k.name for k in all_kernels(program.kernels) if all(isinstance(p, LoopNest) for p in k.parts)}
        mb = ModuleBuilder(program, CPU.target({"threads": 2}))
        mb.build()
        functions = {id(fn): fn for _, name, fn, _ in mb.parts if name in nests}
        loops = sum(str(fn).count(".head:") for fn in functions.values())
        state = {k: v.copy() for k, v in m.state.items()}
        out = make_program("cpu", graph, state, options={"cache_dir": tmp_path / tag}).run(feeds)
        return loops, out, state

    before = build_and_run("as is")
    change()
    return before, build_and_run("changed")


def _same_step(a, b, rtol):
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=rtol, atol=1e-6, err_msg=k)
    for k in a[2]:
        np.testing.assert_allclose(a[2][k], b[2][k], rtol=rtol, atol=1e-6, err_msg=k)


def test_sums_over_one_channel_run_as_one_pass(tmp_path, monkeypatch):
    """A batchnorm gradient's sums over a channel (and the one that needs their result,
    split into sums that do not) run in one loop nest: fewer loops than emitted one sum
    at a time, and the same training step."""
    from dlc.backends.llvm.emit import Emitter
    fused, plain = _resnet_bn_step_built_twice(
        tmp_path, lambda: monkeypatch.setattr(Emitter, "group_sums", lambda self, exprs, bound: None))
    assert fused[0] < plain[0]
    _same_step(fused, plain, 1e-4)


def test_loop_nests_run_a_contiguous_plane_as_one_loop(tmp_path, monkeypatch):
    """A loop nest's inner loops over an 8x8 plane (resnet_bn's batchnorm and residual
    kernels) are one loop of 64, which vectorizes at full width: fewer loops than one
    per axis, and the same training step."""
    from dlc.backends.llvm import emit
    from dlc.backends.llvm.irutil import i64
    real = emit._merged_loops

    def one_loop_per_axis(em, vars_, stores, bounds, vectorize=False):  # every range explicit: nothing merges
        return real(em, vars_, stores, {v.name: bounds.get(v.name, (i64(0), i64(v.extent))) for v in vars_}, vectorize)
    merged, plain = _resnet_bn_step_built_twice(
        tmp_path, lambda: monkeypatch.setattr(emit, "_merged_loops", one_loop_per_axis))
    assert merged[0] < plain[0]
    _same_step(merged, plain, 1e-5)


def _llvm_pipeline(monkeypatch, optimize) -> list:
    """Compile with `optimize(llmod, tm)` in place of every default pipeline (O3 and the
    convolutions'), and machine code at level 1, in this process; the list that each use
    appends to."""
    from dlc.backends.llvm import jit
    from dlc.backends.llvm.target import Target
    machine = Target.machine
    used = []

    def counted(llmod, tm):
        used.append(llmod)
        return optimize(llmod, tm)
    monkeypatch.setattr(Target, "machine", lambda self, opt=3: machine(self, 1))
    monkeypatch.setattr(jit, "compile_workers", lambda: 1)  # (no forked compiler: `used` sees every module)
    _compiled_here(monkeypatch)
    for name in ("O3", "pretuned"):
        monkeypatch.setitem(jit.PIPELINES, name, counted)
    return used


@pytest.mark.parametrize("name, batch", [(p.stem, {"resnet_bn": 13, "digits_mlp": 8}.get(p.stem, 5))
                                         for p in EXAMPLES])
def test_every_llvm_pipeline_computes_the_same_bits(name, batch, tmp_path, monkeypatch):
    """The kernels carry no fast-math flag (the emitters fuse multiply-adds and vectorize
    sums themselves, in one order), so a training step of every example compiled with the
    quick tier's passes, or with no LLVM optimizer at all, computes exactly the bits the O3
    code does: outputs and updated state. The quick tier's code may then stand in for the optimized
    code until that is swapped in (--quick-start) without changing a result."""
    from dlc.backends.llvm import jit
    m = example_models.load(next(p for p in EXAMPLES if p.stem == name), short=True)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    feeds = _example_feeds(m, batch, np.random.default_rng(0))

    def run(tag):
        state = {k: v.copy() for k, v in m.state.items()}
        out = make_program("cpu", graph, state, options={"cache_dir": tmp_path / tag}).run(feeds)
        return out, state

    optimized = run("O3")
    for tag, optimize in (("quick", jit._quick), ("none", lambda llmod, tm: None)):
        used = _llvm_pipeline(monkeypatch, optimize)
        got = run(tag)
        assert used  # (the step was compiled so)
        for have, want in zip(got, optimized):
            for k in want:
                assert np.array_equal(have[k], want[k], equal_nan=True), (tag, k)
    assert any(np.any(optimized[1][k] != m.state[k]) for k in m.state)  # the step did update


@pytest.mark.parametrize("n", [2, 7, 15, 16, 17, 64, 100])
@pytest.mark.parametrize("width", [8, 16])
def test_vectorized_sums_cover_every_length(n, width, monkeypatch):
    """A float sum vectorized by the emitter (whole vectors, then a masked last vector)
    adds every element once, whatever its length against the vector width, and reads
    nothing past the end: the gradient of a softmax
    cross-entropy over n classes, sums of exp(x - max) included, against the reference."""
    from dlc.backends.llvm import emit
    monkeypatch.setattr(emit, "_vector_width", lambda fn: width)
    src = f"""model m(x: f32[B, {n}]) -> f32[B, {n}] {{ return dense(x, {n}) }}
train m {{
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = sgd(lr=0.5)
    batch = 3
}}"""
    m = dlc.load(src)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    feeds = _example_feeds(m, 3, np.random.default_rng(n))
    state = {k: v.copy() for k, v in m.state.items()}
    got = make_program("cpu", graph, state, options={"no_cache": True}).run(feeds)
    want_state = {k: v.copy() for k, v in m.state.items()}
    want = make_program("reference", graph, want_state).run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in want_state:
        np.testing.assert_allclose(state[k], want_state[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _plane_loops(outer: int, inner: int) -> tuple[str, str]:
    """dst[r, c] = src[r, c] + bias[r] over `outer` rows of `inner` floats: the function's
    IR, and its IR as LLVM optimizes it."""
    from llvmlite import ir
    from dlc.backends.llvm.irutil import F32, PTR, VOID, for_range, gep, i64, set_target
    from dlc.backends.llvm.jit import optimized_ir
    from dlc.backends.llvm.target import Target
    target = Target.host(1)
    module = ir.Module()
    module.triple = target.triple
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * 3), name="planes")
    set_target(fn, target, target.vector_width)
    for arg in fn.args:
        arg.add_attribute("noalias")
    src, bias, dst = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with for_range(b, 0, outer, "row") as r:
        add = b.load(gep(b, bias, r, F32), typ=F32)
        with for_range(b, 0, inner, "col") as c:
            at = b.add(b.mul(r, i64(inner)), c)
            b.store(b.fadd(b.load(gep(b, src, at, F32), typ=F32), add), gep(b, dst, at, F32))
    b.ret_void()
    return str(module), optimized_ir([module], target)


def test_a_loop_around_a_long_loop_is_not_unrolled():
    """Six rows around a 784-element loop stay a loop of six (LLVM unrolled it into six
    vectorized copies of the inner loop); three rows of three are still LLVM's to unroll."""
    text, opt = _plane_loops(6, 784)
    assert text.count("!llvm.loop") == 1 and "llvm.loop.unroll.disable" in text
    assert opt.count("\nvector.body:") == 1
    text, _ = _plane_loops(3, 3)
    assert "llvm.loop" not in text


def test_convolutions_and_their_packers_leave_no_loop_to_llvm_to_unroll():
    """Every loop of a convolution's functions and its im2col packers is marked not to be
    unrolled (their emitters unroll what pays), and only theirs: the other kernels' short
    loops are still LLVM's to unroll."""
    import re
    text = dlc.load(EXAMPLES[0].parent / "lenet5.dln").ir("llvm")
    functions = dict(re.findall(r'define [^@]*@"?([\w.]+)"?\(.*?\n\{(.*?)\n\}', text, re.S))
    convs = {n: body for n, body in functions.items() if re.search(r"_conv\.|^im2col", n)}
    assert any(n.startswith("im2col") for n in convs) and len(convs) >= 6

    def loops(body):
        return len(re.findall(r"\.head(\.\d+)?:", body))
    for name, body in convs.items():
        assert loops(body) and body.count("!llvm.loop") == loops(body), name
    assert any(body.count("!llvm.loop") < loops(body) for n, body in functions.items() if n not in convs)


def test_zero_vectors_and_splats_are_written_short_in_the_llvm_ir():
    """A vector of zeros is written `zeroinitializer` and a splat inserts into `poison`:
    llvmlite writes a vector constant out lane by lane (its zero vectors were 17% of the
    residual network's IR text, its splats' 6%). -0.0 is not a zero vector."""
    import re

    from llvmlite import ir

    from dlc.backends.llvm.irutil import F32, const_vector
    text = dlc.load(EXAMPLES[0].parent / "lenet5.dln").ir("llvm")
    assert "zeroinitializer" in text and "> poison, " in text
    lanes = r"(float|i32|i64|i1) +(0x0|0\.0|0|false)"
    assert not re.search(rf"<{lanes}, {lanes}", text)  # no zero vector lane by lane
    assert str(const_vector(F32, (-0.0,) * 2)) == "<2 x float> <float 0x8000000000000000, float 0x8000000000000000>"
    assert str(const_vector(ir.IntType(32), (0, 0))) == "<2 x i32> zeroinitializer"


def test_a_stride1_gradient_packs_its_taps_in_the_forward_order():
    """The data gradient of a stride-1 3x3 layer reads its taps in the forward's order
    (ascending offsets), so where the grids match, both products share one im2col packer."""
    from dlc.backends.llvm.conv import _phases
    [(ry, rx, GH, GW, taps)] = _phases(8, 8, 3, 3, 1, 1, 1, 1)
    assert [(roff, coff) for _, _, roff, coff in taps] == [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert sorted((ky, kx) for ky, kx, _, _ in taps) == [(ky, kx) for ky in range(3) for kx in range(3)]


INPUTS_MODEL = """
model lin(x: f32[B, FEATURES]) -> f32[B, OUTPUTS] {
    param w: f32[FEATURES, OUTPUTS] = normal(0, 0.2)
    return tanh(x @ w)
}
train lin {
    data = arrays()
    loss = mse(output, label)
    optimizer = sgd(lr=0.1)
    batch = BATCH
}
"""


def _lin_programs(features: int, outputs: int, batch: int):
    """The CPU and reference programs of INPUTS_MODEL from the same initial weights."""
    m = dlc.load(INPUTS_MODEL.replace("FEATURES", str(features)).replace("OUTPUTS", str(outputs))
                 .replace("BATCH", str(batch)))
    g = m.compile_graph("train")
    m.ensure_state(g)
    return [make_program(t, g, {k: v.copy() for k, v in m.state.items()}) for t in ("cpu", "reference")]


def test_a_step_reads_float32_inputs_in_place_and_copies_the_rest():
    """A C-ordered float32 input (of more than a few KiB) is read where it lies (no staging
    copy); a float64 or strided one is copied. Each step computes from the data passed to
    that call: the same array changed between calls, and arrays of either kind in turn,
    as the interpreter does."""
    cpu, ref = _lin_programs(40, 3, 32)
    step = cpu.step_for(32)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 40)).astype(np.float32)  # 5 KiB
    label = rng.normal(size=(32, 3)).astype(np.float32)
    wide = rng.normal(size=(32, 80)).astype(np.float32)
    for feed in (x, "changed", (x + 1).astype(np.float64), wide[:, ::2], x):
        if isinstance(feed, str):
            x *= -0.5  # the same array, new values
            feed = x
        feeds = {"x": feed, "label": label, "lr": 0.1}
        got, want = cpu.run(feeds), ref.run(feeds)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        in_place = step.table[step._slot["x"]] == feed.ctypes.data
        assert in_place == (feed.dtype == np.float32 and feed.flags.c_contiguous)
    assert step.table[step._slot["label"]] != label.ctypes.data  # 384 bytes: copied
    np.testing.assert_allclose(cpu.state["w"], ref.state["w"], rtol=1e-5)


def test_an_input_sharing_memory_with_a_parameter_is_copied():
    """The step writes its parameters in place and its kernels assume that no two of their
    arrays alias: an input that is (a view of) a parameter's array is read from a copy."""
    cpu, ref = _lin_programs(40, 40, 40)
    step = cpu.step_for(40)
    label = np.ones((40, 40), np.float32)
    zeros = np.zeros((40, 40), np.float32)
    cpu.run({"x": zeros, "label": label, "lr": 0.1})  # state arrays in the table
    ref.run({"x": zeros, "label": label, "lr": 0.1})
    w = cpu.state["w"]
    for feed in (w, w.reshape(-1).reshape(40, 40), w.copy()):
        want = ref.run({"x": feed.copy(), "label": label, "lr": 0.1})  # before the step changes w
        got = cpu.run({"x": feed, "label": label, "lr": 0.1})
        in_place = step.table[step._slot["x"]] == feed.ctypes.data
        assert in_place != np.shares_memory(feed, w)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(cpu.state["w"], ref.state["w"], rtol=1e-5)
    # partial overlaps, edges included, with state arrays at elements [10, 20), [12, 15) (a view
    # inside the first) and [50, 60) of one buffer
    from dlc.backends.llvm.runtime import _spans
    base = np.zeros(100, np.float32)
    step._state_starts, step._state_ends = _spans([base[50:60], base[12:15], base[10:20]])
    spans = ((0, 10), (5, 11), (19, 30), (20, 50), (45, 55), (59, 60), (60, 70))
    assert [step._overlaps_state(base[a:b]) for a, b in spans] == [False, True, True, False, True, True, False]


def test_a_kernel_writing_an_input_breaks_the_contract():
    from dlc.core.kernel import Buffer, ContractError, Kernel, KernelProgram, check_program
    from dlc.core.kernel.ir import Exprs, LoopNest, Store
    from dlc.core.types import DType
    x = Buffer("x", DType.f32, (4,), "input")
    ex = Exprs()
    i = ex.var("i", 4)
    nest = LoopNest((i,), (), [], [Store(x, i, ex.lit(0.0, DType.f32))])
    program = KernelProgram([Kernel("k", 0, [nest])], {}, 64, {}, [], {}, {})
    with pytest.raises(ContractError, match="writes input x"):
        check_program(program)


def test_a_kernel_reading_what_no_kernel_wrote_breaks_the_contract():
    from dlc.core.kernel import Buffer, ContractError, Kernel, KernelProgram, check_program
    from dlc.core.kernel.ir import Exprs, Load, LoopNest, Store
    from dlc.core.types import DType
    t, u, out = (Buffer(n, DType.f32, (4,), "arena", 16 * k) for k, n in enumerate(("t", "u", "out")))
    ex = Exprs()
    i, j = ex.var("i", 4), ex.var("j", 4)
    writes_t = LoopNest((i,), (), [], [Store(t, i, ex.lit(1.0, DType.f32))])
    reads_u = LoopNest((j,), (), [], [Store(out, j, ex.op("add", [Load(t, j), Load(u, j)], DType.f32))])
    program = KernelProgram([Kernel("k0", 0, [writes_t]), Kernel("k1", 1, [reads_u])], {}, 64, {}, [], {}, {})
    with pytest.raises(ContractError, match="k1: reads u before any kernel writes it"):
        check_program(program)
    program.kernels[0].parts.append(LoopNest((i,), (), [], [Store(u, i, ex.lit(2.0, DType.f32))]))
    check_program(program)


CONCAT_OF_A_STORED_VALUE = """\
model net(x: i32[B, 2]) -> f32[B, 2, 4] {
    e = embedding(x, 2, 2)
    return concat([e, exp(-e)], axis=2)
}

train net {
    data = arrays()
    loss = mse(output, label)
    optimizer = sgd(lr=0.1)
    batch = 5
}
"""


def test_a_concat_kernel_stores_the_values_of_its_pieces_that_the_gradient_reads():
    """exp(-e) is computed in the concat's kernel and read again by the backward pass: the
    piece's loop stores it too. (Found by tests/test_fuzz.py: the store was dropped, the
    gradient read a buffer no kernel wrote, and the embedding trained wrongly.)"""
    x = np.array([[0, 1], [1, 1], [0, 0], [1, 0], [1, 1]], np.int32)
    y = np.random.default_rng(1).random((5, 2, 4), dtype=np.float32)
    tables = {}
    for target in ("reference", "cpu"):
        m = dlc.load(CONCAT_OF_A_STORED_VALUE)
        sess = m.session(m.train_config, target, **({"no_cache": True} if target == "cpu" else {}))
        for _ in range(2):
            sess.train_step(x, y, 0.1)
        tables[target] = m.state["e.table"].copy()
    np.testing.assert_allclose(tables["cpu"], tables["reference"], rtol=1e-5, atol=1e-6)
