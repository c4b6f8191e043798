"""The graph IR: typed nodes with ordered operands and source spans, with an index of users.

The operand tuple on each node is the truth (`x*x` is `(x, x)`); the index (node -> its
users, each with the number of operand slots it reads the node in) serves users and
orderings. Passes use this class's methods, never the index directly. (The index was a
networkx MultiDiGraph: copying it for every pass and its topological sorts were a third
of the passes' time, and importing networkx a tenth of starting dlc.)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any

from dlc.core.diagnostics import Span
from dlc.core.ops import INPUT, OpDef
from dlc.core.types import ShapeError, TensorType


@dataclass(frozen=True, eq=False)
class Node:
    op: OpDef
    operands: tuple[int, ...]
    attrs: dict[str, Any]  # never mutated: passes build a new Node
    type: TensorType
    span: Span | None = None


class VerifyError(Exception):
    """A pass produced an ill-formed graph: a compiler bug, not a user error."""


@dataclass
class Graph:
    name: str
    outputs: dict[str, int] = field(default_factory=dict)  # named results: output, loss, ...
    updates: dict[str, int] = field(default_factory=dict)  # param/state name -> its new value
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._nodes: dict[int, Node] = {}
        self._inputs: dict[int, None] = {}  # input nodes, in id order (found without a scan of every node)
        self._users: dict[int, dict[int, int]] = {}  # node -> {user: operand slots reading it}
        self._next = 0

    # --- reading -----------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self._nodes[nid]

    def __contains__(self, nid: int) -> bool:
        return nid in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def ids(self) -> list[int]:
        return list(self._nodes)

    def operands(self, nid: int) -> tuple[int, ...]:
        return self._nodes[nid].operands

    def users(self, nid: int) -> list[int]:
        """Distinct users, in id order."""
        return sorted(self._users.get(nid, ()))

    def roots(self) -> list[int]:
        return list(dict.fromkeys(list(self.outputs.values()) + list(self.updates.values())))

    def inputs(self, role: str | None = None) -> list[int]:
        return [i for i in self._inputs if role is None or self._nodes[i].attrs["role"] == role]

    def input_named(self, name: str) -> int:
        for i in self._inputs:
            if self._nodes[i].attrs["name"] == name:
                return i
        raise KeyError(name)

    def toposort(self) -> list[int]:
        """Deterministic: among ready nodes the oldest (smallest id) comes first."""
        return self._toposort()

    def _toposort(self) -> list[int]:
        waiting = {nid: len({o for o in n.operands if o in self._nodes}) for nid, n in self._nodes.items()}
        ready = [nid for nid, k in waiting.items() if k == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            nid = heapq.heappop(ready)
            order.append(nid)
            for u in self._users.get(nid, ()):
                if u in waiting:
                    waiting[u] -= 1
                    if waiting[u] == 0:
                        heapq.heappush(ready, u)
        if len(order) != len(self._nodes):
            raise VerifyError(f"graph {self.name} has a cycle")
        return order

    def _link(self, nid: int, operands) -> None:
        for src in operands:
            users = self._users.setdefault(src, {})
            users[nid] = users.get(nid, 0) + 1

    def _unlink(self, nid: int, operands) -> None:
        for src in operands:
            users = self._users.get(src)
            if users is not None and nid in users:
                users[nid] -= 1
                if not users[nid]:
                    del users[nid]

    # --- writing -----------------------------------------------------------------------
    def add(self, node: Node) -> int:
        nid = self._next
        self._next += 1
        self._nodes[nid] = node
        if node.op is INPUT:
            self._inputs[nid] = None
        self._users.setdefault(nid, {})
        self._link(nid, node.operands)
        return nid

    def set_node(self, nid: int, node: Node) -> None:
        """Replace the node at nid (same id, possibly new operands)."""
        old = self._nodes[nid]
        self._unlink(nid, old.operands)
        self._nodes[nid] = node
        if node.op is INPUT and old.op is not INPUT:  # (kept in id order)
            self._inputs = dict.fromkeys(sorted([*self._inputs, nid]))
        elif old.op is INPUT and node.op is not INPUT:
            del self._inputs[nid]
        self._link(nid, node.operands)

    def replace_all_uses(self, old: int, new: int) -> None:
        if old == new:
            return
        for user in self.users(old):
            n = self._nodes[user]
            self.set_node(user, replace(n, operands=tuple(new if o == old else o for o in n.operands)))
        for table in (self.outputs, self.updates):
            for k, v in table.items():
                if v == old:
                    table[k] = new

    def remove(self, nid: int) -> None:
        if self.users(nid):
            raise VerifyError(f"node {nid} still has users")
        self._unlink(nid, self._nodes[nid].operands)
        self._users.pop(nid, None)
        del self._nodes[nid]
        self._inputs.pop(nid, None)

    def ancestors(self, nids) -> set[int]:
        """The nodes these are computed from, themselves included."""
        seen: set[int] = set()
        stack = list(nids)
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self._nodes[n].operands)
        return seen

    def remove_unused(self, keep_inputs: bool = True) -> int:
        """Drop nodes no result depends on (inputs too, unless keep_inputs). Returns the count."""
        live = self.ancestors(self.roots())
        dead = [i for i in self._nodes if i not in live and not (keep_inputs and self._nodes[i].op is INPUT)]
        for i in dead:
            self._unlink(i, self._nodes[i].operands)
        for i in dead:
            self._users.pop(i, None)
            del self._nodes[i]
            self._inputs.pop(i, None)
        return len(dead)

    def copy(self) -> "Graph":
        g = Graph(self.name, dict(self.outputs), dict(self.updates), dict(self.meta))
        g._nodes = dict(self._nodes)
        g._inputs = dict(self._inputs)
        g._users = {k: dict(v) for k, v in self._users.items()}
        g._next = self._next
        return g

    # --- checking ----------------------------------------------------------------------
    def verify(self) -> None:
        """Re-run every shape rule and check the structure; raise VerifyError on a defect."""
        self._toposort()  # raises on a cycle
        for nid, n in self._nodes.items():
            if any(o not in self._nodes for o in n.operands):
                raise VerifyError(f"node %{nid} ({n.op.name}) reads a missing node")
            if n.op.arity is not None and len(n.operands) != n.op.arity:
                raise VerifyError(f"node %{nid} ({n.op.name}) has {len(n.operands)} operands")
            try:
                t = n.op.infer(*(self._nodes[o].type for o in n.operands), **n.attrs)
            except ShapeError as e:
                raise VerifyError(f"node %{nid} ({n.op.name}): {e}") from None
            if t != n.type:
                raise VerifyError(f"node %{nid} ({n.op.name}) is typed {n.type} but its rule gives {t}")
        for name, nid in list(self.outputs.items()) + list(self.updates.items()):
            if nid not in self._nodes:
                raise VerifyError(f"result {name} refers to a missing node")
        for name, nid in self.updates.items():
            target = self._nodes[self.input_named(name)]
            if target.attrs["role"] not in ("param", "state") or target.type != self._nodes[nid].type:
                raise VerifyError(f"update of {name} does not match its input")


