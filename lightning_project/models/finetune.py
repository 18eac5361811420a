"""What trains and at which learning rate: freezing by pattern or stage, frozen BatchNorm, parameter groups.

A pattern is either a dotted module path (`features`, `layer4`, `classifier.6`), which selects that
module's parameters, or a regular expression matched from the start of names from
`named_parameters()` (`features\\.(0|2)\\.`). A pattern that matches nothing is an error, never a
silent no-op: that is the bug hand-written loops hide (`classifier.0.biase`).

Every parameter group holds its frozen parameters too: the optimizer skips tensors without a
gradient (no update, no weight decay, no momentum), and unfreezing later only flips
`requires_grad`, so schedulers never meet a group they did not know about. (Lightning's
BaseFinetuning and fastai add groups as they unfreeze, which OneCycle and ReduceLROnPlateau
cannot follow.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_project.errors import UserError, close_names

MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
STRATEGIES = ("full", "feature_extractor", "partial", "gradual")
POOLS = (nn.MaxPool2d, nn.AvgPool2d)  # VGG and AlexNet blocks end at a pooling layer
NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
GROUP_KEYS = ("name", "patterns", "lr", "lr_scale")  # our keys; any other key is an optimizer option


def matcher(pattern: str, where: str) -> Callable[[str], bool]:
    if MODULE_PATH.fullmatch(pattern):
        return lambda name: name == pattern or name.startswith(pattern + ".")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None
    return lambda name: rx.match(name) is not None


def _candidates(names: list[str]) -> list[str]:
    """Parameter names and every module path above them, for 'did you mean' hints."""
    paths = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    return sorted(paths) + names


def aliases(net: nn.Module, head: str) -> dict[str, list[str]]:
    """`@head` (the new head), `@neck` (the block before it), `@body` (everything earlier).

    They let one recipe (optim=sgd_groups) fit any torchvision model; the VGG and ResNet configs
    spell the same parts out by name.
    """
    blocks = stages(net, head)
    return {
        "@head": [head],
        "@neck": blocks[-2][1] if len(blocks) > 1 else [],
        "@body": [p for _, paths in blocks[:-2] for p in paths],
    }


def select(
    names: list[str], patterns: Iterable[str], where: str, alias: dict[str, list[str]] | None = None
) -> list[str]:
    """Names matched by any pattern, in model order; a pattern that matches nothing is an error."""
    expanded: list[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        if pattern.startswith("@"):
            if alias is None or pattern not in alias or not alias[pattern]:
                known = ", ".join(k for k, v in (alias or {}).items() if v)
                raise UserError(f"{where}: unknown or empty alias {pattern!r}; known here: {known}")
            expanded += alias[pattern]
        else:
            expanded.append(pattern)
    chosen: set[str] = set()
    for pattern in expanded:
        match = matcher(str(pattern), where)
        hits = [n for n in names if match(n)]
        if not hits:
            raise UserError(
                f"{where}: pattern {pattern!r} matches no parameter; closest names: "
                f"{close_names(str(pattern), _candidates(names))}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_layer(m: nn.Module) -> bool:
    """A single layer: parameters of its own, no child holding any."""
    return _has_params(m) and not any(_has_params(c) for c in m.children())


def _split_at_pools(name: str, child: nn.Module) -> list[tuple[str, list[str]]]:
    """A Sequential with pooling layers among its children (VGG's `features`) as one block per
    pooling stage (`features.0-4`, ..., `features.24-30`); any other module as one block."""
    subs = list(child.named_children())
    if not isinstance(child, nn.Sequential) or sum(isinstance(m, POOLS) for _, m in subs) < 2:
        return [(name, [name])]
    chunks, current = [], []
    for sub, m in subs:
        current.append((sub, m))
        if isinstance(m, POOLS):
            chunks.append(current)
            current = []
    chunks.append(current)
    return [
        (f"{name}.{chunk[0][0]}-{chunk[-1][0]}", [f"{name}.{sub}" for sub, m in chunk if _has_params(m)])
        for chunk in chunks
        if any(_has_params(m) for _, m in chunk)
    ]


def _blocks(module: nn.Module, prefix: str, head: str) -> list[tuple[str, list[str]]]:
    """`module`'s children as blocks, in order: consecutive single layers merged (ResNet's
    conv1+bn1), pooled Sequentials split (VGG), the child holding the head reduced to its other
    layers (VGG's classifier.0 and classifier.3), the head itself left out."""
    out: list[tuple[str, list[str]]] = []
    layers: list[str] = []
    for sub, child in module.named_children():
        path = prefix + sub
        if not _has_params(child) or path == head:
            continue
        if _is_layer(child) and not head.startswith(path + "."):
            layers.append(path)
            continue
        if layers:
            out.append(("+".join(layers), layers))
            layers = []
        if head.startswith(path + "."):
            rest = [f"{path}.{n}" for n, m in child.named_children() if _has_params(m) and f"{path}.{n}" != head
                    and not head.startswith(f"{path}.{n}.")]
            out += [(path, rest)] if rest else []
        else:
            out += _split_at_pools(path, child)
    if layers:
        out.append(("+".join(layers), layers))
    return out


def stages(net: nn.Module, head: str) -> list[tuple[str, list[str]]]:
    """The network's blocks from input to output as (name, module paths), the new head last.

    The unit of `partial`, `gradual` and `lr_decay`: ResNet: conv1+bn1, layer1..layer4; VGG:
    features.0-4 .. features.24-30, classifier (its .0 and .3); a network whose top level has
    fewer than three blocks is cut one level deeper into its largest one (EfficientNet,
    MobileNet, ConvNeXt, DenseNet: the children of `features`).
    """
    own = [(n, [n]) for n, _ in net.named_parameters(recurse=False)]  # e.g. ViT's class_token
    body = _blocks(net, "", head)
    if len(body) < 3:
        size = {name: sum(p.numel() for path in paths for p in net.get_submodule(path).parameters())
                for name, paths in body}
        big = max(body, key=lambda b: size[b[0]], default=None)
        if big is not None and len(big[1]) == 1:
            module = net.get_submodule(big[1][0])
            inner = [(f"{big[1][0]}.{n}", [f"{big[1][0]}.{n}"]) for n, _ in module.named_parameters(recurse=False)]
            inner += _blocks(module, big[1][0] + ".", head)
            if len(inner) > 1:
                i = body.index(big)
                body = body[:i] + inner + body[i + 1:]
    return own + body + [("head", [head])]


def unfreeze_schedule(net: nn.Module, head: str, milestones: Iterable[int]) -> list[tuple[int, list[str], list[str]]]:
    """Gradual unfreezing as (epoch, block names, module paths): one more block from the top at
    each milestone, and everything left at the last one (so training ends fully unfrozen)."""
    milestones = list(milestones)
    body = stages(net, head)[:-1][::-1]  # from the head down
    valid = all(isinstance(m, int) and m >= 1 for m in milestones) and milestones == sorted(set(milestones))
    if not milestones or not valid:
        raise UserError(
            f"finetune.milestones={milestones}: give increasing epoch numbers >= 1 (e.g. [2,4,6]); "
            "the head trains alone before the first"
        )
    if len(milestones) > len(body):
        raise UserError(
            f"finetune.milestones={milestones}: {type(net).__name__} has {len(body)} blocks below the head "
            f"({', '.join(s for s, _ in body)}); give at most {len(body)} milestones"
        )
    plan = []
    for i, epoch in enumerate(milestones):
        chunk = body[i:i + 1] if i < len(milestones) - 1 else body[i:]
        plan.append((epoch, [s for s, _ in chunk], [p for _, paths in chunk for p in paths]))
    return plan


def check_milestones(milestones: list[int], max_epochs: int | None) -> None:
    """The last milestone must fall inside the run, or training never ends fully unfrozen."""
    if milestones and max_epochs is not None and 0 < max_epochs <= milestones[-1]:
        raise UserError(
            f"finetune.milestones={milestones}: the last milestone (epoch {milestones[-1]}) is never reached "
            f"with trainer.max_epochs={max_epochs}; train longer or move the milestones earlier"
        )


def plan_trainable(
    net: nn.Module,
    head: str,
    strategy: str = "full",
    train_stages: int = 1,
    freeze: Iterable[str] = (),
    unfreeze: Iterable[str] = (),
    alias: dict[str, list[str]] | None = None,
) -> set[str]:
    """Names of the parameters that train.

    full: everything; feature_extractor and gradual (at its start): the new head only; partial:
    the head and the last `train_stages` blocks before it (see `stages`). Then `freeze` patterns
    are frozen and `unfreeze` patterns made trainable again.
    """
    names = [n for n, _ in net.named_parameters()]
    alias = alias if alias is not None else aliases(net, head)
    if strategy == "full":
        trainable = set(names)
    elif strategy in ("feature_extractor", "gradual"):
        trainable = set(select(names, [head], "finetune (head)"))
    elif strategy == "partial":
        body = stages(net, head)[:-1]
        if not 1 <= train_stages <= len(body):
            raise UserError(
                f"finetune.train_stages={train_stages}: {type(net).__name__} has {len(body)} blocks before "
                f"the head ({', '.join(s for s, _ in body)}); choose 1..{len(body)}"
            )
        patterns = [head] + [p for _, paths in body[-train_stages:] for p in paths]
        trainable = set(select(names, patterns, "finetune.partial"))
    else:
        raise UserError(f"finetune.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    trainable -= set(select(names, freeze, "finetune.freeze", alias))
    trainable |= set(select(names, unfreeze, "finetune.unfreeze", alias))
    return trainable


def frozen_norm_layers(net: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers whose affine parameters are all frozen.

    `requires_grad=False` does not stop BatchNorm from updating its running statistics in train
    mode, so these layers must be put in eval mode after every `train()` call.
    """
    return [
        m for m in net.modules()
        if isinstance(m, _BatchNorm)
        and any(True for _ in m.parameters())
        and not any(p.requires_grad for p in m.parameters())
    ]


@dataclass
class ParamGroup:
    name: str
    patterns: list[str]
    names: list[str]  # parameter names, frozen ones included
    options: dict = field(default_factory=dict)  # lr, weight_decay, momentum, ... as the optimizer takes them


def plan_groups(
    net: nn.Module, specs: Iterable[dict], base_lr: float, rest: str = "default",
    alias: dict[str, list[str]] | None = None,
) -> tuple[list[ParamGroup], list[str]]:
    """Parameter groups from specs `{name, patterns, lr | lr_scale, **optimizer options}`.

    `lr` is absolute, `lr_scale` multiplies `base_lr` (default 1); patterns may use the `alias`
    names (@body, @neck, @head). Parameters matched by no group go to a `default` group at
    `base_lr` (rest='default') or are frozen (rest='freeze', returned as the second value). A
    parameter claimed by two groups is an error.
    """
    if rest not in ("default", "freeze"):
        raise UserError(f"optim.rest={rest!r}: choose default (own group at optim.lr) or freeze")
    if not base_lr > 0:
        raise UserError(f"optim.lr={base_lr}: the learning rate must be positive")
    names = [n for n, _ in net.named_parameters()]
    owner: dict[str, str] = {}
    groups: list[ParamGroup] = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        label = f"optim.groups[{i}]"
        if not spec.get("name") or not spec.get("patterns"):
            raise UserError(f"{label}: needs a name and a non-empty patterns list, got {spec}")
        name, patterns = str(spec.pop("name")), spec.pop("patterns")
        patterns = [patterns] if isinstance(patterns, str) else [str(p) for p in patterns]
        label = f"optim.groups.{name}"
        if name in {g.name for g in groups} | ({"default"} if rest == "default" else set()):
            raise UserError(f"{label}: the group name {name!r} is used twice; give each group its own name")
        lr, scale = spec.pop("lr", None), spec.pop("lr_scale", None)
        if lr is not None and scale is not None:
            raise UserError(f"{label}: set lr (absolute) or lr_scale (times optim.lr), not both")
        lr = float(lr) if lr is not None else base_lr * float(1.0 if scale is None else scale)
        if not lr > 0:
            raise UserError(f"{label}.lr={lr}: the learning rate must be positive")
        members = select(names, patterns, f"{label}.patterns", alias)
        for n in members:
            if n in owner:
                raise UserError(
                    f"{label}: parameter {n} is also claimed by group {owner[n]!r}; make the patterns disjoint"
                )
            owner[n] = name
        groups.append(ParamGroup(name, patterns, members, {"lr": lr, **spec}))
    ungrouped = [n for n in names if n not in owner]
    if rest == "freeze":
        return groups, ungrouped
    if ungrouped:
        groups.append(ParamGroup("default", ["(no group)"], ungrouped, {"lr": base_lr}))
    return groups, []


def group_table(groups: list[ParamGroup], net: nn.Module, defaults: dict) -> list[dict]:
    """One row per group for the start-of-run table: tensors and parameters trainable/total, lr, decay."""
    params = dict(net.named_parameters())
    rows = []
    for g in groups:
        ps = [params[n] for n in g.names]
        rows.append({
            "group": g.name,
            "patterns": ", ".join(g.patterns),
            "tensors": f"{sum(p.requires_grad for p in ps)}/{len(ps)}",
            "trainable": sum(p.numel() for p in ps if p.requires_grad),
            "frozen": sum(p.numel() for p in ps if not p.requires_grad),
            "lr": g.options["lr"],
            "weight_decay": g.options.get("weight_decay", defaults.get("weight_decay", 0.0)),
        })
    return rows


def split_by_stage(groups: list[ParamGroup], net: nn.Module, head: str, decay: float) -> list[ParamGroup]:
    """Discriminative learning rates: each group cut into its blocks (see `stages`), the top
    block at the group's lr and each block below at the lr of the one above times `decay`.

    Without explicit groups the head keeps optim.lr, the last block gets lr*decay and so on down
    to the stem (ULMFiT's and timm's layer decay); with explicit groups (optim=sgd_groups) the
    decay refines each group from its own lr.
    """
    if not 0 < decay <= 1:
        raise UserError(f"finetune.lr_decay={decay}: give a factor in (0, 1] (e.g. 0.3), or null for none")
    names = [n for n, _ in net.named_parameters()]
    block_of: dict[str, int] = {}
    blocks = stages(net, head)
    for index, (_, paths) in enumerate(blocks):
        for n in select(names, paths, "finetune.lr_decay"):
            block_of[n] = index
    out = []
    for g in groups:
        present = sorted({block_of[n] for n in g.names}, reverse=True)  # from the top
        for index in present:
            members = [n for n in g.names if block_of[n] == index]
            block = blocks[index][0]
            name = g.name if len(present) == 1 else (block if g.name == "default" else f"{g.name}:{block}")
            options = {**g.options, "lr": g.options["lr"] * decay ** (present[0] - index)}  # blocks below the top
            out.append(ParamGroup(name, g.patterns, members, options))
    return out


def split_no_decay(groups: list[ParamGroup], net: nn.Module, weight_decay: float) -> list[ParamGroup]:
    """Weight decay off for normalisation weights and biases (a `<group>:no_decay` twin at 0).

    Decaying a BatchNorm scale or a bias towards zero only fights the normalisation (as in timm
    and the torchvision reference recipes' `norm_weight_decay=0`); groups without decay stay whole.
    """
    no_decay = {f"{mod}.{n}" if mod else n for mod, m in net.named_modules()
                for n, _ in m.named_parameters(recurse=False) if isinstance(m, NORMS) or n == "bias"}
    out = []
    for g in groups:
        if float(g.options.get("weight_decay", weight_decay)) == 0:
            out.append(g)
            continue
        keep = [n for n in g.names if n not in no_decay]
        skip = [n for n in g.names if n in no_decay]
        out += [ParamGroup(g.name, g.patterns, keep, g.options)] if keep else []
        out += [ParamGroup(f"{g.name}:no_decay", g.patterns, skip, {**g.options, "weight_decay": 0.0})] if skip else []
    return out
