"""`owl2 cache info` and `owl2 cache clear`: what the disk cache holds (docs/cache.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from owl2_edge.cli.app import app, console, fail
from owl2_edge.errors import Owl2Error

cache_app = typer.Typer(no_args_is_help=True, help="The disk cache of pictures' embeddings and "
                                                   "KV prefixes: info, clear.")
app.add_typer(cache_app, name="cache")

_DIR_HELP = "The cache's folder (default: $OWL2_CACHE_DIR, else ~/.cache/owl2-edge/prefixes)."


def _store(cache_dir: Optional[Path]):
    from owl2_edge.disk_cache import DiskStore, default_cache_dir
    folder = cache_dir or default_cache_dir()
    if not folder.is_dir():
        return None, folder
    return DiskStore(folder), folder


@cache_app.command("info")
def info_cmd(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_DIR_HELP),
             as_json: bool = typer.Option(False, "--json", help="One JSON object.")):
    """Entries, bytes and hit rates (counted by every process using the folder)."""
    from owl2_edge.disk_cache import human_size
    try:
        store, folder = _store(cache_dir)
        info = store.info() if store else {"folder": str(folder), "entries": 0, "bytes": 0,
                                            "kinds": {}}
    except Owl2Error as e:
        raise fail(str(e))
    if as_json:
        print(json.dumps(info), flush=True)
        return
    console.print(f"{info['folder']}: {info['entries']} entries, {human_size(info['bytes'])}"
                  + ("" if store else " (no folder yet)"), markup=False, soft_wrap=True)
    for kind, k in info["kinds"].items():
        rate = "-" if k["hit_rate"] is None else f"{k['hit_rate']:.0%}"
        console.print(f"  {kind:7s} {k['entries']:6d} entries {human_size(k['bytes']):>10s} · "
                      f"{k['hits']} hits, {k['misses']} misses (hit rate {rate})",
                      markup=False, soft_wrap=True)


@cache_app.command("clear")
def clear_cmd(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_DIR_HELP)):
    """Remove every entry and the counters."""
    try:
        store, folder = _store(cache_dir)
        removed = store.clear() if store else 0
    except Owl2Error as e:
        raise fail(str(e))
    console.print(f"{folder}: removed {removed} entries", markup=False, soft_wrap=True)
