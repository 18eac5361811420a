"""What `input=` names: an image file, a folder (searched recursively) or a glob, or a list of them."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from lightning_project.data.datasets import _hidden
from lightning_project.data.images import IMAGE_EXTENSIONS
from lightning_project.errors import UserError


def _folder(root: Path) -> list[Path]:
    return [
        f for f in sorted(root.rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(_hidden(part) for part in f.relative_to(root).parts)
    ]


def expand_inputs(spec: str | Path | Sequence[str | Path], where: str = "input") -> list[Path]:
    """The image files `spec` names, in a stable order, each once.

    A file named explicitly is kept whatever its extension (if it does not decode, its row says
    why); folders and globs contribute files with an image extension only.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise UserError(f"{where}: required; give an image file, a folder or a glob (input='photos/*.jpg')")
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: dict[Path, None] = {}
    for item in specs:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found = _folder(path)
            if not found:
                raise UserError(f"{where}={item}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(path)):
            found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
            if not found:
                raise UserError(f"{where}={item}: the pattern matches no file")
        else:
            raise UserError(f"{where}={item}: no such file or folder (and not a glob pattern)")
        out.update(dict.fromkeys(found))
    return list(out)
