"""The graph of a GSSM as configured: nodes, their parents and modes, validated into a DAG (`data.gssm`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanollama.utils.checks import ConfigError, check

Mode = Literal["default", "slow", "dead", "context"]
KernelType = Literal["product", "fullrank"]


@dataclass
class NodeConfig:
    """One node of the graph: a Markov chain over `state_dim` states (the observed one emits tokens)."""

    name: str  # unique within the graph; parents refer to it
    state_dim: int  # number of states (the observed node's is the vocabulary)
    alpha: float = 1.0  # Dirichlet concentration of the kernel rows (small: near-deterministic)
    parents: list[str] = field(default_factory=list)  # nodes whose new states this node reads
    mode: Mode = "default"  # slow: sticky chain; dead: collapses to state 0; context: kernels redrawn per sequence
    kernel_type: KernelType = (
        "product"  # product: one kernel per input, rows multiplied; fullrank: one row per joint input
    )
    observed: bool = False  # the one node that emits the tokens

    def __post_init__(self):
        check(self.state_dim >= 1, "state_dim", f"node '{self.name}': state_dim must be >= 1, got {self.state_dim}")
        check(self.alpha > 0, "alpha", f"node '{self.name}': alpha must be > 0, got {self.alpha}")
        check(
            not (self.mode == "slow" and self.parents),
            "parents",
            f"node '{self.name}': a slow node cannot have parents",
        )
        check(
            not (self.observed and self.mode in ("slow", "dead")),
            "mode",
            f"node '{self.name}': the observed node cannot be in {self.mode} mode",
        )


@dataclass
class GSSMConfig:
    """The graph: nodes with parent links forming a DAG, exactly one of them observed."""

    nodes: list[NodeConfig] = field(
        default_factory=lambda: [
            NodeConfig("hidden", state_dim=16, alpha=0.1),
            NodeConfig("tokens", state_dim=16, alpha=0.1, parents=["hidden"], observed=True),
        ]
    )

    def __post_init__(self):
        _ = self.order  # validates: unique names, one observed node, known parents, no cycle

    @property
    def observed(self) -> NodeConfig:
        return next(n for n in self.nodes if n.observed)

    @property
    def vocab_size(self) -> int:
        return self.observed.state_dim

    @property
    def order(self) -> list[NodeConfig]:
        """The nodes in a topological order (parents first); raises ConfigError on a bad graph."""
        names = [n.name for n in self.nodes]
        check(len(self.nodes) > 0, "nodes", "the graph needs at least one node")
        for i, n in enumerate(self.nodes):
            check(names.count(n.name) == 1, f"nodes.{i}.name", f"node name '{n.name}' is used twice")
            for p in n.parents:
                check(p in names, f"nodes.{i}.parents", f"node '{n.name}': unknown parent '{p}'")
                check(n.parents.count(p) == 1, f"nodes.{i}.parents", f"node '{n.name}': parent '{p}' is listed twice")
        observed = [n.name for n in self.nodes if n.observed]
        check(len(observed) == 1, "nodes", f"exactly one node must be observed, got {len(observed)} {observed}")
        for i, n in enumerate(self.nodes):
            check(
                not (n.observed is False and observed[0] in n.parents),
                f"nodes.{i}.parents",
                f"node '{n.name}': the observed node '{observed[0]}' cannot be a parent",
            )
        done: list[NodeConfig] = []
        pending = list(self.nodes)
        while pending:
            ready = [n for n in pending if all(p in {d.name for d in done} for p in n.parents)]
            if not ready:
                raise ConfigError("nodes", f"the parent links form a cycle: {_cycle(pending)}")
            done += ready
            pending = [n for n in pending if n not in ready]
        return done


def _cycle(pending: list[NodeConfig]) -> str:
    """A cycle among nodes that are all waiting for a parent, as 'a' -> 'b' -> 'a'."""
    waiting = {n.name: n for n in pending}
    path, node = [], pending[0]
    while node.name not in path:  # every waiting node has a waiting parent, so this walk must loop
        path.append(node.name)
        node = waiting[next(p for p in node.parents if p in waiting)]
    loop = path[path.index(node.name) :] + [node.name]
    return " -> ".join(f"'{name}'" for name in loop)
