"""The resolved configuration: printed as a tree at start, saved in the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.tree import Tree

FIRST = ("data", "model", "finetune", "optim", "scheduler", "augment", "trainer")


def plain(node: Any) -> Any:
    """A config node as plain dicts/lists (resolved), for functions below the entry points."""
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def print_tree(cfg: DictConfig, console: Console | None = None) -> None:
    tree = Tree("config", guide_style="dim")
    keys = [k for k in FIRST if k in cfg] + [k for k in cfg if k not in FIRST]
    for key in keys:
        value = cfg[key]
        branch = tree.add(f"[bold]{key}[/bold]")
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            branch.add(OmegaConf.to_yaml(value, resolve=True).rstrip() or "{}")
        else:
            branch.label = f"[bold]{key}[/bold]: {value}"
    (console or Console()).print(tree)


def save(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config (Hydra's own copy keeps ${...} interpolations unresolved)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
