"""The house: what gets installed, what the runtime imports, and the docs the code cites.

- the wheel holds the runtime, the native decoder and the converter (from the top-level convert/
  folder), and its runtime imports and runs `owl2 --help` with no converter package installed;
- importing the runtime and the CLI, and answering a question, never loads torch, onnx, gguf-py
  or the converter;
- the layers: nothing under owl2_edge/ outside tools/ imports torch or the converter (not even
  lazily), and nothing that owl2.py imports imports it back;
- every `docs/architecture.md §N` / `docs/design.md §N` a comment cites is a heading there.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a runtime-only install does not have, and what the runtime must never import. onnx is
# installed with the runtime (owl2_edge/vision_variants.py derives vision files with it), but
# answering a question must not pay for importing it.
CONVERTER_MODULES = ("torch", "sentencepiece", "safetensors")
NEVER_ON_THE_RUNTIME_PATH = (*CONVERTER_MODULES, "onnx", "gguf", "owl2_edge.convert")

# Run in a child: blocks the converter's packages (an ImportError, as if not installed), runs
# the given code, then fails if a module that must stay out was imported.
_GUARD = """
import sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed here", name=name)
sys.meta_path.insert(0, Block())
{code}
NEVER = {never!r}
loaded = sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in NEVER))
assert not loaded, f"loaded on the runtime path: {{loaded}}"
print("ok")
"""


def _run_guarded(code: str, python_args: tuple[str, ...] = (),
                 never: tuple[str, ...] = NEVER_ON_THE_RUNTIME_PATH) -> subprocess.CompletedProcess:
    script = _GUARD.format(blocked=CONVERTER_MODULES, never=never, code=code)
    # Run from tests/, not the checkout's root: `python -c` puts its folder on sys.path, and the
    # root's owl2_edge/ sources must not shadow an installed (non-editable) owl2-edge.
    return subprocess.run([sys.executable, *python_args, "-c", script], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent)


# --- The runtime never imports the converter --------------------------------------------------------

def test_importing_the_runtime_and_the_cli_loads_no_converter_package():
    r = _run_guarded("""
import owl2_edge
from owl2_edge import Owl2, Chat
import owl2_edge.cli, owl2_edge.owl2, owl2_edge.decoder, owl2_edge.vision, owl2_edge.tokenizer
from owl2_edge.cli import app
for args in (["--help"], ["ask", "--help"], ["chat", "--help"], ["info", "--help"]):
    assert not app(args, standalone_mode=False), args
""")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_answering_a_question_loads_no_converter_package(tiny_model_dir, tmp_path):
    from PIL import Image
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    r = _run_guarded(f"""
from owl2_edge.cli import app
assert not app(["ask", {str(photo)!r}, "What is this?", "-m", {str(tiny_model_dir)!r}, "-n", "4",
                "--temperature", "0", "--json"], standalone_mode=False)
""")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    assert '"token_ids"' in r.stdout


def test_convert_without_the_converter_packages_says_how_to_install_them(tmp_path):
    r = _run_guarded(f"""
from owl2_edge.cli import app
assert app(["convert", {str(tmp_path)!r}, "-o", {str(tmp_path / "out")!r}], standalone_mode=False) == 1
""", never=())
    assert r.returncode == 0, r.stderr
    assert "pip install 'owl2-edge[convert]'" in r.stderr and "Traceback" not in r.stderr


# --- The wheel ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from this checkout (in its own build folder,
    against the llama-cpp-python and build tools installed here)."""
    pytest.importorskip("scikit_build_core", reason="building the wheel needs the dev extra")
    pytest.importorskip("nanobind", reason="building the wheel needs the dev extra")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                        "-q", "-w", str(out), f"--config-settings=build-dir={out / 'build'}",
                        str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (found,) = out.glob("owl2_edge-*.whl")
    return found


def test_the_wheel_holds_the_runtime_the_decoder_and_the_converter(wheel):
    files = set(zipfile.ZipFile(wheel).namelist())
    converter = {f"owl2_edge/convert/{p.name}" for p in (ROOT / "convert").glob("*.py")}
    runtime = {f"owl2_edge/{p.relative_to(ROOT / 'owl2_edge').as_posix()}"
               for p in (ROOT / "owl2_edge").rglob("*.py")}
    runtime.add("owl2_edge/serve/static/index.html")  # the chat page `owl2 serve` serves at /
    assert converter and converter <= files, sorted(converter - files)
    assert runtime <= files, sorted(runtime - files)
    # The trained demo model's checkpoint, which `owl2 demo` converts.
    demo = {f"owl2_edge/convert/demo_model/{p.name}" for p in (ROOT / "convert" / "demo_model").iterdir()}
    assert demo and demo <= files, sorted(demo - files)
    assert any(re.fullmatch(r"owl2_edge/_decoder\..*\.so", f) for f in files), sorted(files)
    # Nothing of the repository's own scaffolding rides along.
    assert not any(f.startswith(("tests/", "convert/", "cpp_ext/", "benchmarks/")) for f in files)


def test_the_wheels_runtime_works_without_the_converter_packages(wheel, tmp_path):
    """Unpack the wheel and run it with no converter package importable: the runtime, the CLI's
    help and the native decoder load from the wheel, not from this checkout."""
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    site = Path(sysconfig.get_paths()["purelib"])
    # The decoder finds ggml beside it, in llama_cpp/lib (its rpath), as in a real install.
    (unpacked / "llama_cpp").symlink_to(site / "llama_cpp")
    r = _run_guarded(f"""
sys.path[:0] = [{str(unpacked)!r}, {str(site)!r}]   # no .pth files: not this checkout's editable hook
import owl2_edge, owl2_edge._decoder, owl2_edge.owl2
assert owl2_edge.__file__.startswith({str(unpacked)!r}), owl2_edge.__file__
assert owl2_edge._decoder.__file__.startswith({str(unpacked)!r}), owl2_edge._decoder.__file__
from owl2_edge.cli import app
assert not app(["--help"], standalone_mode=False)
""", python_args=("-S",))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


# --- The layers -------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (a function's lazy import too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


RUNTIME_SOURCES = {_module_name(p): p for p in sorted((ROOT / "owl2_edge").rglob("*.py"))}


def test_only_the_tools_reach_torch_or_the_converter():
    offending = [f"{name} imports {m}" for name, path in RUNTIME_SOURCES.items()
                 if not name.startswith("owl2_edge.tools")
                 for m in sorted(_imports(path))
                 if m.split(".")[0] == "torch" or m.startswith("owl2_edge.convert")]
    assert not offending, offending


def test_the_answer_path_imports_no_tool_and_nothing_imports_owl2_back():
    answer_path = [name for name in RUNTIME_SOURCES
                   if not name.startswith(("owl2_edge.tools", "owl2_edge.cli"))]
    into_tools = [f"{name} imports {m}" for name in answer_path
                  for m in sorted(_imports(RUNTIME_SOURCES[name]))
                  if m.startswith(("owl2_edge.tools", "owl2_edge.cli"))]
    assert not into_tools, into_tools
    # What owl2.py stands on, transitively, within the package (the package's face, whose lazy
    # __getattr__ hands out Owl2, aside).
    below, todo = set(), ["owl2_edge.owl2"]
    while todo:
        for m in _imports(RUNTIME_SOURCES[todo.pop()]):
            if m in RUNTIME_SOURCES and m not in below and m not in ("owl2_edge.owl2", "owl2_edge"):
                below.add(m)
                todo.append(m)
    assert {"owl2_edge.answer", "owl2_edge.chat", "owl2_edge.batch.engine"} <= below
    back = [name for name in sorted(below) if "owl2_edge.owl2" in _imports(RUNTIME_SOURCES[name])]
    assert not back, back


# --- The docs the code cites ----------------------------------------------------------------------

CITATION = re.compile(r"docs/(architecture|design)\.md (§[\d.]+(?:(?:, | and )§[\d.]+)*)")
SOURCES = [p for folder in ("owl2_edge", "convert", "cpp_ext", "tests", "benchmarks", "scripts")
           for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".cpp", ".h", ".sh")
           and p != Path(__file__).resolve()]


def _headings(doc: str) -> set[str]:
    """Section numbers of a doc's numbered headings: '## 4. Decoder' -> '4', '### 4.2 X' -> '4.2'."""
    text = (ROOT / "docs" / f"{doc}.md").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", text, re.M)}


def test_every_section_the_code_cites_exists():
    headings = {doc: _headings(doc) for doc in ("architecture", "design")}
    cited, missing = 0, []
    for path in SOURCES:
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            for section in re.findall(r"§([\d.]+)", m.group(2)):
                cited += 1
                if section.rstrip(".") not in headings[m.group(1)]:
                    missing.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)}.md §{section}")
    assert cited > 30, cited
    assert not missing, missing


def test_the_code_cites_no_design_notes_outside_the_repository():
    stale = re.compile(r"owl2-architecture|(?<!docs/)(?:design|architecture)\.md|spec §|(?<![\w/.])§\d")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if stale.search(line) and not CITATION.search(line)]
    assert not found, found


def test_the_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/architecture.md" in readme and "docs/design.md" in readme
