"""Placement rules: each channel set of torch-pruning's dependency graph becomes a compactor
site, or a stated reason why not. Rules only; attaching, probing and the transaction live in
``surgery``.

* producer -> BatchNorm (or no norm) -> ...      : output-side DGC after the norm
* producer -> InstanceNorm / IBN-like -> consumer : input-side DGC before the consumer
* producer -> ... depthwise conv (-> BN) -> ...   : diagonal DGC after the depthwise norm
* producer -> BN -> ... grouped conv            : as above, with ``groups``: merge keeps the same
  number of channels in each group (a grouped producer gets a block-diagonal compactor)
* a Linear producer (transformer MLP: Linear -> GELU -> Linear): output-side DGC over the last dim
* channels tied across several producers (a residual addition): skipped, as in the paper; with
  ``residual=True`` a ``ResidualGroup``: one output-side DGC per producer, tied (one mask)
* ``sites='paper'``: of those, only the set that feeds a residual block's last convolution
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch_pruning as tp
from torch import nn

from .dgc import DGC_ATTR
from .graph import foldable_bn, is_dense, is_depthwise, is_grouped


@dataclass
class DGCSite:
    """One compacted channel set."""

    name: str                      # qualified name of the DGC module (``<host>.cdd_dgc``)
    kind: str                      # "out" | "in" | "diag"
    channels: int
    host: str                      # module the DGC is hooked on
    producer: str                  # conv/linear whose output channels are cut
    norm: Optional[str] = None     # BatchNorm folded into the producer (out) / depthwise (diag)
    depthwise: Optional[str] = None
    consumers: List[str] = field(default_factory=list)
    tap: Tuple[str, str] = ("", "output")   # where the matching teacher feature is read
    consumer_shares: Dict[str, int] = field(default_factory=dict)  # input features of each consumer from this set
    groups: int = 1                # the set passes through grouped convs: cut the same count in each group
    blocks: int = 1                # the producer is grouped: the compactor is block-diagonal (``groups`` blocks)
    channels_last: bool = False    # the host is a Linear layer: channels on the last dim (transformer MLPs)
    tie: Optional[str] = None      # the residual group this compactor belongs to (one mask for all its members)
    embedding: bool = False        # its group's channels are (part of) the model output: cut from it too

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "channels": self.channels, "host": self.host,
                "producer": self.producer, "norm": self.norm, "depthwise": self.depthwise,
                "consumers": list(self.consumers), "tap": list(self.tap),
                "consumer_shares": dict(self.consumer_shares), "groups": self.groups, "blocks": self.blocks,
                "channels_last": self.channels_last, "tie": self.tie, "embedding": self.embedding}


@dataclass
class ResidualGroup:
    """Channels tied by residual additions (a ResNet stage's stream): one compactor per producer,
    one mask and one group lasso over the stacked rows of all of them."""

    name: str                      # ``residual:<first member's host>``
    channels: int
    members: List[DGCSite]
    consumers: List[str]
    consumer_shares: Dict[str, int] = field(default_factory=dict)
    output: bool = False           # the stream is the model output (the embedding): cut_embedding


@dataclass
class Skipped:
    layers: List[str]
    reason: str


class Planner:
    """Classifies torch-pruning groups into DGC sites or stated skips."""

    def __init__(self, model: nn.Module, DG: tp.DependencyGraph, residual: bool = False, cut_embedding: bool = False):
        self.model = model
        self.DG = DG
        self.residual = residual     # channels tied by residual additions become ResidualGroups
        self.cut_embedding = cut_embedding  # ... also the one that is the model output
        self.name_of = {m: n for n, m in model.named_modules()}
        self.customized = tuple(t for t in DG.CUSTOMIZED_PRUNERS.keys() if isinstance(t, type))
        self.coupled: set = set()   # producers of channel sets tied by a residual addition

    def _node_outputs(self, m: nn.Module) -> List[Any]:
        node = self.DG.module2node.get(m)
        return [] if node is None else [o.module for o in node.outputs]

    def classify(self, group) -> Tuple[Optional[DGCSite], Optional[Skipped]]:
        DG = self.DG
        producers, depthwise, consumers, norms, others = [], [], [], [], []
        shares: Dict[str, int] = {}
        self.last_shares = shares
        reaches_output = False
        for dep, _idxs in group:
            mod = dep.target.module
            fn = dep.handler
            if isinstance(mod, tp.ops._OutputOp) or (DG.is_out_channel_pruning_fn(fn) and not dep.target.outputs):
                reaches_output = True
                continue
            if dep.target in getattr(DG, "cdd_output_nodes", {}) and not (
                    isinstance(mod, (nn.Conv2d, nn.Linear)) and DG.is_in_channel_pruning_fn(fn)):
                reaches_output = True  # these channels are an output that is also an intermediate
            if isinstance(mod, (tp.ops._ElementWiseOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._ReshapeOp,
                                tp.ops._SliceOp, tp.ops._UnbindOp, tp.ops._ExpandOp)):
                continue
            if isinstance(mod, nn.Parameter):
                others.append(("an unwrapped parameter", mod))
                continue
            is_out = DG.is_out_channel_pruning_fn(fn)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if is_depthwise(mod):
                    depthwise.append(mod)
                elif is_out:
                    producers.append(mod)
                else:
                    consumers.append(mod)
                    shares[self.name_of.get(mod, "?")] = len(_idxs)
            elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                                  nn.GroupNorm, nn.LayerNorm)) or (self.customized and isinstance(mod, self.customized)):
                norms.append(mod)
            elif isinstance(mod, nn.PReLU):
                continue
            else:
                others.append((type(mod).__name__, mod))
        names = lambda ms: [self.name_of.get(m, type(m).__name__) for m in ms]  # noqa: E731
        root_mod = group[0].dep.target.module if len(group) else None
        root = names(producers or depthwise or consumers) or [self.name_of.get(root_mod, type(root_mod).__name__)]

        def skip(reason: str, layers=None) -> Tuple[None, Skipped]:
            return None, Skipped(layers or root, reason)

        if len(producers) > 1:  # a residual stream, whatever else disqualifies it (sites='paper' reads these)
            self.coupled.update(names(producers))
        embedding = reaches_output and self.residual and self.cut_embedding and len(producers) > 1 and not others
        if reaches_output and not embedding:
            return skip("its channels are part of the model output (pruning them would change the output size)"
                        + ("; CDDConfig(cut_embedding=True) cuts a residual stream's zero channels from the embedding"
                           if self.residual and len(producers) > 1 and not self.cut_embedding else ""))
        if others:
            kind, _ = others[0]
            return skip(f"the channel group contains {kind}, which surgery cannot fold exactly")
        if len(producers) != 1:
            if len(producers) == 0:
                return skip("no dense producer owns these channels")
            if self.residual:
                return self._residual(group, producers, consumers, depthwise, norms, shares, output=embedding)
            return skip(f"channels are coupled across {len(producers)} producers ({', '.join(names(producers)[:4])}"
                        f"{', ...' if len(producers) > 4 else ''}) by a residual addition or concatenation; "
                        "the paper does not compact coupled channels", names(producers))
        producer = producers[0]
        pname = self.name_of[producer]
        channels = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
        if channels < 2:
            return skip("the layer has a single output channel")
        grouped = [m for m in consumers + [producer] if is_grouped(m)]
        groups = 1
        if grouped:
            counts = sorted({m.groups for m in grouped})
            if len(counts) > 1:
                return skip(f"grouped convolutions {', '.join(names(grouped)[:3])} split these channels into "
                            f"{' and '.join(map(str, counts))} groups; no cut keeps every one of them balanced",
                            [pname])
            groups = counts[0]
            narrow = [m for m in grouped if m is not producer and m.in_channels != channels]
            if narrow:
                return skip(f"the grouped convolution {names(narrow)[0]} sees {narrow[0].in_channels} input "
                            f"channels, of which these {channels} are a part (concatenation); a balanced cut "
                            "needs them alone", [pname])
            if depthwise:
                return skip("a channel set through both grouped and depthwise convolutions is not supported", [pname])
        bad_norm = [m for m in norms if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
        if bad_norm:
            return skip(f"{type(bad_norm[0]).__name__} {names(bad_norm)[0]} normalises across channels; removing "
                        "channels would change the function", [pname])
        consumer_names = names(consumers)
        if not consumers and not depthwise:
            return skip("its channels reach no layer whose inputs merge could cut (they end in an operation such as "
                        "attention's query-key product, where a zero channel is not a removable one)", [pname])
        if depthwise:
            if len(depthwise) > 1:
                return skip("a chain of several depthwise convolutions is not supported", [pname])
            dw = depthwise[0]
            if dw.out_channels != channels:
                return skip(f"the depthwise convolution {names([dw])[0]} carries {dw.out_channels} channels, of which "
                            f"these {channels} are a part (concatenation); a diagonal compactor needs them alone",
                            [pname])
            outs = self._node_outputs(dw)
            norm = outs[0] if len(outs) == 1 and isinstance(outs[0], nn.Module) and foldable_bn(outs[0]) else None
            host = norm if norm is not None else dw
            hname = self.name_of[host]
            return DGCSite(name=f"{hname}.{DGC_ATTR}", kind="diag", channels=channels, host=hname, producer=pname,
                           norm=self.name_of[norm] if norm is not None else None, depthwise=self.name_of[dw],
                           consumers=consumer_names, tap=(hname, "output")), None
        outs = self._node_outputs(producer)
        first = outs[0] if len(outs) == 1 else None
        blocks = groups if is_grouped(producer) else 1
        if isinstance(first, nn.Module) and foldable_bn(first):
            hname = self.name_of[first]
            return DGCSite(name=f"{hname}.{DGC_ATTR}", kind="out", channels=channels, host=hname, producer=pname,
                           norm=hname, consumers=consumer_names, tap=(hname, "output"), groups=groups,
                           blocks=blocks), None
        if norms and groups > 1:
            return skip(f"the producer's {type(norms[0]).__name__} cannot be folded into it, and an input-side "
                        "compactor on channels through a grouped convolution is not supported", [pname])
        if norms:
            # a norm that cannot be folded backward (InstanceNorm, IBN, a BatchNorm after the activation):
            # compact on the single dense consumer's input instead and fold forward
            if len(consumers) != 1 or not is_dense(consumers[0]):
                return skip(f"the producer's {type(norms[0]).__name__} cannot be folded into it, and an input-side "
                            f"compactor needs exactly one dense consumer (found {len(consumers)})", [pname])
            width = getattr(consumers[0], "in_channels", getattr(consumers[0], "in_features", None))
            if width != channels:
                return skip(f"the consumer {consumer_names[0]} sees {width} input channels, of which these "
                            f"{channels} are a part (concatenation); an input-side compactor needs them alone",
                            [pname])
            cname = consumer_names[0]
            return DGCSite(name=f"{cname}.{DGC_ATTR}", kind="in", channels=channels, host=cname, producer=pname,
                           consumers=consumer_names, tap=(cname, "input"),
                           channels_last=isinstance(consumers[0], nn.Linear)), None
        return DGCSite(name=f"{pname}.{DGC_ATTR}", kind="out", channels=channels, host=pname, producer=pname,
                       consumers=consumer_names, tap=(pname, "output"), groups=groups, blocks=blocks,
                       channels_last=isinstance(producer, nn.Linear)), None


    def _residual(self, group, producers, consumers, depthwise, norms, shares, output=False):
        """A residual group: one tied output-side compactor per producer, or the reason why not."""
        order = {m: i for i, m in enumerate(self.model.modules())}
        producers = sorted(producers, key=lambda m: order.get(m, len(order)))
        name = lambda m: self.name_of.get(m, type(m).__name__)  # noqa: E731
        pnames = [name(p) for p in producers]

        def skip(reason: str) -> Tuple[None, Skipped]:
            return None, Skipped(pnames, f"residual group of {len(producers)} producers: {reason}")

        width = {p: (p.out_channels if isinstance(p, nn.Conv2d) else p.out_features) for p in producers}
        tied = {dep.target.module: len(idxs) for dep, idxs in group if dep.target.module in width
                and self.DG.is_out_channel_pruning_fn(dep.handler)}
        if len(set(width.values())) > 1 or any(tied.get(p, 0) != width[p] for p in producers):
            parts = ", ".join(f"{name(p)} {tied.get(p, 0)} of {width[p]}" for p in producers[:4])
            return skip(f"its members disagree in width ({parts} channels tied): only part of a producer's "
                        "channels is tied (a concatenation?), so one mask cannot cover every member")
        channels = width[producers[0]]
        if channels < 2:
            return skip("the stream has a single channel")
        odd = [m for m in producers + consumers if not is_dense(m)] + list(depthwise)
        if odd:
            return skip(f"the grouped or depthwise convolution {name(odd[0])} reads or writes the stream; tied "
                        "compactors need dense layers around the stream")
        member_norm = {}
        for p in producers:
            outs = self._node_outputs(p)
            member_norm[p] = outs[0] if len(outs) == 1 and isinstance(outs[0], nn.Module) and foldable_bn(outs[0]) \
                else None
        stray = [m for m in norms if all(m is not b for b in member_norm.values())]
        if stray:
            return skip(f"{type(stray[0]).__name__} {name(stray[0])} sits on the stream itself (e.g. a BNNeck, a "
                        "pre-activation block or a transformer's LayerNorm); a zero channel would not stay zero through it, so no "
                        "channel could be removed exactly")
        if not consumers and not output:
            return skip("no layer reads the stream whose inputs merge could cut")
        members = []
        for p in producers:
            bn = member_norm[p]
            host = name(bn) if bn is not None else name(p)
            members.append(DGCSite(name=f"{host}.{DGC_ATTR}", kind="out", channels=channels, host=host,
                                   producer=name(p), norm=name(bn) if bn is not None else None,
                                   consumers=[name(c) for c in consumers], tap=("", "input"),
                                   channels_last=isinstance(p, nn.Linear), embedding=output))
        gname = f"residual:{members[0].host}"
        for m in members:
            m.tie = gname
        return ResidualGroup(gname, channels, members, [name(c) for c in consumers], dict(shares), output), None


def paper_sites(sites: List[DGCSite], coupled: set) -> Tuple[List[DGCSite], List[Skipped]]:
    """The authors' placement: one compactor per residual block, on the channel set that
    feeds the block's last convolution (every consumer of the set produces channels that a
    residual addition ties together). In a bottleneck that is the middle 3x3 output, in a
    basic block the first conv's output; the stem and a bottleneck's first set are left out."""
    kept, dropped = [], []
    for site in sites:
        if site.consumers and all(c in coupled for c in site.consumers):
            kept.append(site)
        else:
            dropped.append(Skipped([site.producer], "sites='paper': not the channel set that feeds a residual "
                                   "block's last convolution (the authors' placement); sites='all' compacts it"))
    return kept, dropped


