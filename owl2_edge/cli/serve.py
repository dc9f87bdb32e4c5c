"""`owl2 serve`: the options and limits of the OpenAI-compatible server (owl2_edge/serve/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from owl2_edge.cli.app import EXIT_INTERRUPTED, app, console, fail
from owl2_edge.cli.options import CACHE, RUNTIME, load_kwargs, with_options
from owl2_edge.errors import Owl2Error
from owl2_edge.serve.limits import Limits as ServeLimits

_SERVE_FLAGS = {"max_queue": "--max-queue", "max_body_bytes": "--max-body-mb",
                "max_images": "--max-images", "max_tokens": "--max-tokens-limit",
                "request_timeout_s": "--request-timeout"}


# The fewest positions the default gives a slot: a picture and a long answer's room.
SLOT_POSITIONS = 512
# The most slots the default opens (more only when asked: each slot's share of --ctx shrinks).
# Measured on 2 cores (docs/serve.md, "Many clients at once"): 4 answers together give 1.2-1.45x
# the tokens per second of 2, at 7B and on a smaller decoder, while 8 gain little more and
# double each stream's gaps; an idle slot costs nothing. So 4 on any machine, as --ctx allows.
DEFAULT_MAX_PARALLEL = 4


def default_parallel(n_ctx: int) -> int:
    """--parallel's default: up to DEFAULT_MAX_PARALLEL slots, each with >= SLOT_POSITIONS."""
    return max(1, min(DEFAULT_MAX_PARALLEL, n_ctx // SLOT_POSITIONS))



@app.command("serve")
@with_options(RUNTIME, CACHE)
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every "
                                                       "interface; think of --api-key then)."),
    port: int = typer.Option(8080, "--port", "-p", help="Port to listen on (0: any free one)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OWL2_API_KEY",
                                          help="Require Authorization: Bearer KEY (also from "
                                               "$OWL2_API_KEY, which keeps it out of ps)."),
    allow_path: list[Path] = typer.Option([], "--allow-path", metavar="DIR",
                                          help="Read file:// images under DIR (repeatable)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="Download http(s) images from public "
                                                  "addresses (size and time limited)."),
    allow_network: list[str] = typer.Option([], "--allow-network", metavar="CIDR",
                                            help="Also download images from this network "
                                                 "(192.168.1.0/24, 127.0.0.1; repeatable)."),
    host_allow: list[str] = typer.Option([], "--host-allow", metavar="NAME",
                                         help="Answer requests for this Host name too, besides "
                                              "IP addresses and localhost (repeatable; * any)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", metavar="ORIGIN",
                                          help="Let web pages from this origin call the API "
                                               "(https://app.example; repeatable; * any)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-np",
                                           help="Requests answered at once, sharing the --ctx "
                                                f"positions (default: up to 4, as --ctx allows, "
                                                f">= {SLOT_POSITIONS} each)."),
    max_queue: int = typer.Option(ServeLimits.max_queue, "--max-queue",
                                  help="Requests that may wait for a slot while all are busy; "
                                       "more get 429 with Retry-After."),
    max_body_mb: float = typer.Option(ServeLimits.max_body_bytes / 2**20, "--max-body-mb",
                                      help="Largest request body in MiB (base64 images included)."),
    max_images: int = typer.Option(ServeLimits.max_images, "--max-images",
                                   help="Most images per request."),
    max_tokens_limit: int = typer.Option(ServeLimits.max_tokens, "--max-tokens-limit",
                                         help="Largest max_tokens a request may ask for."),
    request_timeout: float = typer.Option(ServeLimits.request_timeout_s, "--request-timeout",
                                          metavar="SECONDS",
                                          help="A request's whole time: body, images, queue and "
                                               "answer (the answer is cut there)."),
    *, runtime: dict, cache: dict,
):
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) and a chat page;
    --parallel requests are answered at once (continuous batching), the rest queue."""
    try:
        limits = _serve_limits(max_queue=max_queue, max_body_bytes=_mib(max_body_mb),
                               max_images=max_images, max_tokens=max_tokens_limit,
                               request_timeout_s=request_timeout)
        for folder in allow_path:
            if not folder.is_dir():
                raise Owl2Error(f"--allow-path {folder}: not a folder")
        networks = _networks(allow_network, allow_remote_images)
        _check_names(host_allow, cors_origin)
        from owl2_edge.owl2 import Owl2
        from owl2_edge.serve import server
        from owl2_edge.serve.app import create_app
        load = load_kwargs(runtime, cache)
        load["parallel"] = default_parallel(load["n_ctx"]) if parallel is None else parallel
        with _listen(server, host, port) as sock:  # a port in use fails before the model loads
            owl = Owl2.load(**load)
            app = create_app(owl, limits, api_key=api_key, allow_paths=allow_path,
                             allow_remote_images=allow_remote_images, allow_networks=networks,
                             host_allow=host_allow, cors_origins=cors_origin)
            console.print(f"owl2 serve: {server.url_of(sock)}/ ({owl.folder.name} on "
                          f"{owl.decoder.device}; {owl.parallel} at once, {owl.window} "
                          f"positions each; Ctrl-C stops)",
                          markup=False, soft_wrap=True)
            try:
                server.serve(app, sock)
            except KeyboardInterrupt:
                # uvicorn stops at the first Ctrl-C, then raises it again for us.
                raise typer.Exit(EXIT_INTERRUPTED)
            finally:
                owl.close()
    except Owl2Error as e:
        raise fail(str(e))


def _serve_limits(**values):
    from owl2_edge.errors import ArgumentError
    try:
        return ServeLimits(**values)
    except ArgumentError as e:
        name = str(e).split(" ", 1)[0]
        raise Owl2Error(str(e).replace(name, _SERVE_FLAGS.get(name, name), 1)) from None


def _networks(values: list[str], allow_remote_images: bool):
    from owl2_edge.serve.fetch import parse_networks
    if values and not allow_remote_images:
        raise Owl2Error("--allow-network only matters with --allow-remote-images")
    try:
        return parse_networks(values)
    except ValueError as e:
        raise Owl2Error(f"--allow-network {e}") from None


def _check_names(hosts: list[str], origins: list[str]) -> None:
    for host in hosts:
        if not host or any(c in host for c in "/:@ ") and not host.startswith("["):
            raise Owl2Error(f"--host-allow {host!r}: a host name (owl.example), not a URL")
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not sep or not rest
                              or "/" in rest):
            raise Owl2Error(f"--cors-origin {origin!r}: an origin is scheme://host[:port] "
                            f"(https://app.example), or *")


def _mib(value: float) -> int:
    from owl2_edge.checks import number
    return int(number("--max-body-mb", value, 0, 2**20, lo_open=True) * 2**20)


def _listen(server, host: str, port: int):
    from owl2_edge.checks import integer
    integer("--port", port, 0, 65535)
    try:
        return server.bind(host, port)
    except OSError as e:
        why = e.strerror or str(e)
        raise Owl2Error(f"cannot listen on {host}:{port}: {why}") from None
