"""Where kiln-train finds its Hydra configs.

kiln's own tree is the repository's top-level conf/, the one copy. pyproject.toml ships it as
the package data of `kiln.conf` (kiln/conf/ in a wheel or sdist install); an editable install
reads the checkout's conf/ itself. $KILN_CONFIG_DIR replaces the whole tree.

Users add config groups and options of their own without copying kiln's tree: the directories
in $KILN_CONFIG_PATH (separated like PYTHONPATH) are searched after kiln's tree, so `model=mine`
finds DIR/model/mine.yaml and the optional `local: default` finds DIR/local/default.yaml.
`hydra.searchpath=[file:///abs/dir]` on the command line adds directories the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import kiln

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

TREE_ENV = "KILN_CONFIG_DIR"
SEARCH_ENV = "KILN_CONFIG_PATH"


def config_dir() -> Path:
    """$KILN_CONFIG_DIR, else the tree installed with the package, else the checkout's conf/."""
    env = os.environ.get(TREE_ENV)
    if env:
        return Path(env).resolve()
    package = Path(kiln.__file__).resolve().parent
    shipped = package / "conf"  # wheel / sdist install
    if (shipped / "train.yaml").is_file():
        return shipped
    return package.parents[1] / "conf"  # editable install: platform/kiln -> <checkout>/conf


def user_search_path() -> list[str]:
    """$KILN_CONFIG_PATH as Hydra search-path entries (absolute file:// directories)."""
    entries = []
    for part in os.environ.get(SEARCH_ENV, "").split(os.pathsep):
        if not part.strip():
            continue
        path = Path(part).expanduser().resolve()
        if not path.is_dir():
            print(f"kiln: warning: {SEARCH_ENV} names {path}, which is not a directory; ignored", file=sys.stderr)
            continue
        entries.append(f"file://{path}")
    return entries


class KilnConfigPath(SearchPathPlugin):
    """Appends $KILN_CONFIG_PATH's directories after kiln's own tree (read when Hydra starts)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for entry in user_search_path():
            search_path.append(provider=SEARCH_ENV, path=entry)


def register_search_path() -> None:
    """Make every Hydra app in this process search $KILN_CONFIG_PATH (Hydra's documented manual
    plugin registration: no `hydra_plugins` package installed beside other Hydra apps)."""
    Plugins.instance().register(KilnConfigPath)
