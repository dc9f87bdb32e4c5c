"""Shared fixtures: one tiny checkpoint per test session, written by the project's own generator
in the release's layout (bf16 pickle shards + index, sentencepiece tokenizer), its PyTorch
reference and its converted model folder.

They need the converter (torch & co.); without it the tests that use them skip, and the
runtime-only lane (tests that need no converter) still runs: `pytest` in an environment
installed without the `convert` extra.
"""

import time
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_disk_cache(tmp_path_factory, monkeypatch):
    """Each test its own disk cache folder ($OWL2_CACHE_DIR, which the CLI's commands use by
    default): never the user's, and no test sees another's entries."""
    monkeypatch.setenv("OWL2_CACHE_DIR", str(tmp_path_factory.mktemp("owl2-cache")))
    # and the recipe chooser's kept costs (tools/kept_costs.py) likewise.
    monkeypatch.setenv("OWL2_SENSITIVITY_DIR", str(tmp_path_factory.mktemp("owl2-costs")))


def _converter():
    pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")
    from owl2_edge.convert import checkpoint, converter, reference, tiny
    return checkpoint, converter, reference, tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Path of a tiny mPLUG-Owl2 checkpoint folder (seed 0, bfloat16 pickle shards). Read-only:
    tests that damage a checkpoint make their own with make_tiny_checkpoint."""
    tiny = _converter()[3]
    return tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-owl2"), seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_checkpoint):
    """The tiny checkpoint, opened (a convert.checkpoint.Checkpoint)."""
    return _converter()[0].Checkpoint.open(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_ref(tiny_ckpt):
    """The PyTorch reference of the tiny checkpoint: the oracle of every end-to-end test."""
    return _converter()[2].Owl2Reference.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def owl(tiny_model_dir):
    """An Owl2 on the tiny model (CPU, f32 KV cache: exact against the reference), one per module."""
    from owl2_edge.owl2 import Owl2
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512) as o:
        yield o


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint converted by `owl2 convert`'s own code: F32 decoder, fp32 vision."""
    out = tmp_path_factory.mktemp("models") / "tiny-F32"
    _converter()[1].convert(tiny_checkpoint, out, quant="F32", vision=("fp32",))
    return out


@pytest.fixture(scope="session")
def start_server(tiny_model_dir):
    """A function that serves `owl2 serve`'s app on the tiny model (CPU, f32 KV cache, its own
    Owl2) with uvicorn on a background thread at 127.0.0.1 and a free port:

        with start_server(api_key="k", limits=Limits(max_queue=1)) as served:
            served.url, served.owl, served.app     # base URL (no slash), the Owl2, the app

    n_ctx, parallel and cache are the Owl2's load options (one slot, no disk cache by default).

    Keyword arguments go to owl2_edge.serve.app.create_app."""
    import contextlib
    from types import SimpleNamespace

    @contextlib.contextmanager
    def start(n_ctx: int = 1024, parallel: int = 1, cache=False, **options):
        from owl2_edge.owl2 import Owl2
        from owl2_edge.serve.app import create_app
        from owl2_edge.serve.server import running
        with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=n_ctx,
                       parallel=parallel, cache=cache) as owl:
            app = create_app(owl, **options)
            with running(app) as url:
                yield SimpleNamespace(url=url, owl=owl, app=app)
    return start


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The trained demo model (convert/demo_model) converted: F32 decoder, fp32 vision."""
    converter = _converter()[1]
    from owl2_edge.convert import DEMO_CHECKPOINT
    out = tmp_path_factory.mktemp("models") / "demo-F32"
    converter.convert(DEMO_CHECKPOINT, out, quant="F32", vision=("fp32",))
    return out


@pytest.fixture(scope="module")
def demo_server(demo_model_dir):
    """`owl2 serve` on the demo model (F32, two slots), one per test module: .url, .owl, .app.
    The client tests ask it what the demo can know, so each call shows a right answer."""
    from types import SimpleNamespace

    from owl2_edge.owl2 import Owl2
    from owl2_edge.serve.app import create_app
    from owl2_edge.serve.server import running
    with Owl2.load(demo_model_dir, device="cpu", n_ctx=2048, parallel=2) as owl:
        app = create_app(owl)
        with running(app) as url:
            yield SimpleNamespace(url=url, owl=owl, app=app)


@pytest.fixture(scope="module")
def tiny_server(start_server):
    """`owl2 serve` on the tiny model with the default options, one per test module (see
    start_server): .url, .owl, .app."""
    with start_server() as served:
        yield served


def like_a_terminal() -> None:
    """preexec_fn of a child that a test interrupts as a terminal's Ctrl-C would: SIGINT to its
    default action, so that Python in the child raises KeyboardInterrupt. (A suite started in
    the background by a non-interactive shell runs with SIGINT ignored, and a child inherits
    that: it would never see the test's SIGINT.)"""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- holding the engine still (serve and concurrency tests) ----------------------------------------

def hold_slot(owl, timeout: float = 60.0):
    """A context in which one answer holds one of `owl`'s slots and makes no progress: its
    picture (noise no other test sends) is kept from the vision model until the block ends, so
    the engine has admitted it and waits for its embeddings, as for any slow picture. Yields its
    Job; on leaving, the picture is let through, the answer cancelled and waited for."""
    import contextlib
    import threading

    import numpy as np
    from PIL import Image

    from owl2_edge.sampling import SamplingParams

    @contextlib.contextmanager
    def held():
        release, real = threading.Event(), owl.vision.encode_images
        noise = Image.fromarray(np.random.default_rng(12345).integers(0, 256, (40, 40, 3),
                                                                      dtype=np.uint8))
        prepared = owl.prepare("<|image|> Hold on.", [noise])
        key = prepared.items[0][1]

        def encode_images(images, keys=None):
            if keys and key in keys:
                release.wait(timeout)
            return real(images, keys=keys)

        owl.vision.encode_images = encode_images
        job = owl.submit(prepared, SamplingParams(temperature=0, max_tokens=1))
        try:
            deadline = time.monotonic() + timeout
            while job.seq is None and time.monotonic() < deadline:  # admitted: it holds a slot
                time.sleep(0.01)
            yield job
        finally:
            job.cancel()
            release.set()
            ended = threading.Event()
            job.add_done_callback(lambda _: ended.set())
            ended.wait(timeout)
            del owl.vision.encode_images  # the class's own again
    return held()


def slow_steps(monkeypatch, owl, seconds: float) -> None:
    """Every decoder pass of `owl` takes `seconds` longer (answers that last, for tests of time
    limits and clients that leave)."""
    real = owl.decoder.eval_sequences

    def eval_sequences(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    monkeypatch.setattr(owl.decoder, "eval_sequences", eval_sequences)
