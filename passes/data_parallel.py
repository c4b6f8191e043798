"""Data-parallel training: each rank of a job runs the step on its shard of every global
batch; these two passes make the ranks' steps add up to one process's step on the whole
batch. They run only when the PassContext says the job has several ranks.

shard (before autodiff)
    The loss each rank differentiates is its share of the global loss: the shard's loss
    times `shard_weight` (an input: the shard's size / the global batch size, 0 for a rank
    that holds no sample this step), so the sum over ranks of the shares is the loss of
    the whole batch (for any loss that is a mean over samples plus terms that do not
    depend on the batch: regularizers count once, as their weights sum to 1). A mean over
    a mask's kept positions (graph.meta["masked_means"]) is first made the shard's total
    over the count of the whole batch's kept positions (an allreduce), divided by the
    weight. Random tensors with a batch axis are numbered as this shard's slice of the
    global batch's (from `sample_offset`, the global index of its first sample, in a batch
    of `global_batch`), so dropout draws what one process would for the same samples.

allreduce (after autodiff, before the optimizer)
    Every gradient becomes `allreduce(grad)`, the sum over ranks of the shares, before the
    optimizer reads it: every rank then applies the same update. Gradients are put in
    buckets of about `bucket_bytes`, in reverse order of the parameters (the order in
    which the backward pass produces them, as PyTorch's DDP does); one bucket travels as
    one exchange. The reported loss and metrics are summed over ranks too (metrics weighted
    by the shard's share), so they are the global batch's, and the optimizer's guard
    against a non-finite loss decides the same way in every rank.
    Then every exchange of the step (these buckets, and allreduces already in the graph:
    batchnorm(sync=true)) gets its number, in the order in which they can run, and every
    allreduce its place in its exchange (`bucket`, `part`): ranks whose shards differ in
    size run different compiled steps, whose exchanges must still meet one to one.
"""
from __future__ import annotations

from dlc.core import ops
from dlc.core.builder import GraphBuilder, Value
from dlc.core.graph import Graph, Node
from dlc.core.types import DType, TensorType, numel

SHARD_WEIGHT = "shard_weight"
SAMPLE_OFFSET = "sample_offset"
GLOBAL_BATCH = "global_batch"
BUCKET_BYTES = 1 << 20  # measured: benchmarks/bench_distributed.py (one 2 MB exchange cost 1.8x two smaller)


def hyper_input(b: GraphBuilder, name: str, dtype: DType) -> Value:
    """The scalar input `name` (role hyper), created once."""
    try:
        return b.value(b.graph.input_named(name))
    except KeyError:
        with b.at(None):
            return b.input(name, TensorType(dtype, ()), "hyper")


def shard(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    b = GraphBuilder(g)
    weight = hyper_input(b, SHARD_WEIGHT, DType.f32)
    data = g.inputs("data")
    if data:
        batch = g.node(data[0]).type.shape[0]
        for nid in g.ids():
            n = g.node(nid)
            if n.op is not ops.RANDOM or len(n.operands) != 2 or batch not in n.type.shape:
                continue
            axis = list(n.type.shape).index(batch)  # the batch axis: a slice of the global batch's tensor
            place = (hyper_input(b, SAMPLE_OFFSET, DType.i32).id,)
            if axis:  # (an RNN's dropout between layers: [T, B, H])
                place += (hyper_input(b, GLOBAL_BATCH, DType.i32).id,)
            g.set_node(nid, Node(n.op, n.operands + place, dict(n.attrs, axis=axis) if axis else n.attrs,
                                 n.type, n.span))
    for nid in g.meta.get("masked_means", ()):
        if nid in g:
            _share_by_positions(g, b, nid, weight)
    loss = b.value(g.outputs["loss"])
    with b.at(loss.node.span):
        g.outputs["loss"] = (loss * weight).id
    return g


def _share_by_positions(g: Graph, b: GraphBuilder, nid: int, weight: Value) -> None:
    """A mean over a mask's kept positions, total / max(count, 1): the shares of the ranks
    must add up to the global batch's total over its count, whatever each rank's share of
    the samples. So the count becomes the sum over the ranks' counts, and the mean is
    divided by the shard's weight, which the loss (and a metric) is multiplied by later."""
    n = g.node(nid)
    total, bound = n.operands
    count = g.node(bound).operands[0]  # (max(count, 1.0))
    with b.at(n.span):
        has = b.gt(weight, 0.0)  # (a rank without samples this step runs a copy of one: it counts 0)
        everywhere = b.emit(ops.ALLREDUCE, (b.value(count) * b.cast(has, DType.f32),))
        share = b.value(total) / b.maximum(everywhere, 1.0) / b.where(has, weight, 1.0)
    g.replace_all_uses(nid, share.id)


def allreduce(graph: Graph, ctx=None) -> Graph:
    g = graph.copy()
    b = GraphBuilder(g)
    limit = getattr(ctx, "bucket_bytes", None) or BUCKET_BYTES
    names = [g.node(i).attrs["name"] for i in g.inputs("param")]
    bucket, filled = 0, 0
    for name in reversed(names):
        grad = b.value(g.outputs[f"grad:{name}"])
        if _is_zero(g, grad.id):
            continue  # the loss does not depend on it: zero in every rank
        size = numel(grad.shape) * grad.dtype.np.itemsize
        if filled and filled + size > limit:
            bucket, filled = bucket + 1, 0
        filled += size
        with b.at(grad.node.span):
            g.outputs[f"grad:{name}"] = b.emit(ops.ALLREDUCE, (grad,), bucket=bucket).id
    grad_buckets = bucket + 1
    weight = hyper_input(b, SHARD_WEIGHT, DType.f32)
    for key, nid in list(g.outputs.items()):
        if key == "output" or ":" in key or not g.node(nid).type.dtype.is_float:
            continue  # (results with a `:` are per sample: output:NAME, a named result; carry:NAME, a state)
        value = b.value(nid)
        with b.at(value.node.span):
            share = value if key == "loss" else value * weight  # the loss is a share already
            g.outputs[key] = b.emit(ops.ALLREDUCE, (share,), bucket=0).id
    _number_exchanges(g, grad_buckets)
    return g


def _number_exchanges(g: Graph, grad_buckets: int) -> None:
    """Renumber every allreduce's (bucket, part): buckets in an order in which each can run
    once the ones before it have (a topological order of the buckets), the soonest ready
    first (by the longest path from the inputs to its last member); parts in the order the
    members were made."""
    groups: dict[object, list[int]] = {}
    for nid in sorted(g.ids()):
        n = g.node(nid)
        if n.op is ops.ALLREDUCE:
            bucket = n.attrs.get("bucket", -1)
            groups.setdefault(bucket if 0 <= bucket < grad_buckets else ("alone", nid), []).append(nid)
    group_of = {m: key for key, members in groups.items() for m in members}
    depth: dict[int, int] = {}
    before: dict[int, frozenset] = {}  # node -> the groups whose allreduces it depends on
    for nid in g.toposort():
        operands = g.node(nid).operands
        depth[nid] = 1 + max((depth[o] for o in operands), default=0)
        deps = frozenset().union(*(before[o] for o in operands))
        before[nid] = deps | {group_of[nid]} if nid in group_of else deps
    ready = {key: max(depth[m] for m in members) for key, members in groups.items()}
    needs = {key: set().union(*(before[m] for m in members)) - {key} for key, members in groups.items()}
    number = 0
    while needs:
        key = min((k for k, n in needs.items() if not n), key=lambda k: (ready[k], min(groups[k])))
        for part, nid in enumerate(groups[key]):
            n = g.node(nid)
            g.set_node(nid, Node(n.op, n.operands, {"bucket": number, "part": part}, n.type, n.span))
        number += 1
        del needs[key]
        for n in needs.values():
            n.discard(key)


def _is_zero(g: Graph, nid: int) -> bool:
    n = g.node(nid)
    if n.op is ops.BROADCAST:
        n = g.node(n.operands[0])
    return n.op is ops.CONST and not n.attrs["value"].any()
