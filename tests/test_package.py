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


def _in_package(name: str, packages: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `packages` or inside one (owl2_edge.clips is not in
    owl2_edge.cli)."""
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_answer_path_imports_no_tool_and_nothing_imports_owl2_back():
    tools = ("owl2_edge.tools", "owl2_edge.cli")
    answer_path = [name for name in RUNTIME_SOURCES if not _in_package(name, tools)]
    into_tools = [f"{name} imports {m}" for name in answer_path
                  for m in sorted(_imports(RUNTIME_SOURCES[name])) if _in_package(m, tools)]
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


def test_the_readme_is_a_newcomers_path():
    """The README stays a short path (what it is, start here, each command, tests) that links
    the docs for the detail, and every doc it links exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = set(re.findall(r"(?<![\w/.-])(docs/[\w./-]+?\.md)\b", readme))
    assert {"docs/design.md", "docs/architecture.md"} <= linked, sorted(linked)
    missing = sorted(path for path in linked if not (ROOT / path).is_file())
    assert not missing, missing


def test_no_assert_is_not_none_on_answers():
    """No test asserts that an answer `is not None`: ask(), generate(), create_chat_completion()
    and the openai client's completions.create() never return None, nor is a chat reply's
    message content ever None here, so such an assert passes for any implementation, a broken one
    included. Compare with something a broken one would get wrong instead: the exact greedy
    text or tokens, the reference's answer, another route's answer, a difference that must show.

    Forbidden (`X is not None` as the whole assert or an operand of its top-level `and`):
    X a call to ask / generate / create_chat_completion / completions.create, with anything
    chained after it (`owl.ask(...)`, `owl.create_chat_completion(...)["choices"][0]`), or X a
    chain ending in a chat message's content (`reply.choices[0].message.content`,
    `body["choices"][0]["message"]["content"]`); also `isinstance(<such a call>, str)`.
    Left alone, on purpose: Optional results (`store.get(...) is not None`, `refusal(...)`),
    a stream chunk's `delta.content` (None in its role chunk), and any call merely given an
    answer (`re.match(p, owl.ask(...)) is not None`). The source of each assert is matched
    with the regexes below; ast only cuts the files into asserts (multi-line ones included)."""
    answer = re.compile(r"""^(?:[\w.\[\]'"]*\.)?(?:ask|generate|create_chat_completion
                            |completions\.create)\s*\(.*\)(?:\s*(?:\[[^\]]*\]|\.\w+))*$""",
                        re.X | re.S)
    content = re.compile(r"""^[\w.]+(?:\s*(?:\[[^\]]*\]|\.\w+))*?
                             (?:\.message\.content
                               |\[\s*["']message["']\s*\]\s*\[\s*["']content["']\s*\])$""",
                         re.X | re.S)

    def offences(source: str) -> list[int]:
        lines = []
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Assert):
                continue
            parts = (node.test.values if isinstance(node.test, ast.BoolOp)
                     and isinstance(node.test.op, ast.And) else [node.test])
            for part in parts:
                if (isinstance(part, ast.Compare) and [type(op) for op in part.ops] == [ast.IsNot]
                        and isinstance(part.comparators[0], ast.Constant)
                        and part.comparators[0].value is None):
                    said = ast.get_source_segment(source, part.left)
                    flagged = answer.match(said) or content.match(said)
                elif (isinstance(part, ast.Call) and isinstance(part.func, ast.Name)
                        and part.func.id == "isinstance" and len(part.args) == 2
                        and isinstance(part.args[1], ast.Name) and part.args[1].id == "str"):
                    flagged = answer.match(ast.get_source_segment(source, part.args[0]))
                else:
                    flagged = False
                if flagged:
                    lines.append(part.lineno)
        return sorted(lines)

    # The scan itself can fail: it flags each forbidden form, and none of the legitimate ones.
    sample = '''
assert owl.ask(picture, "Q?", temperature=0) is not None
assert owl.ask(picture, "Q?",
               max_tokens=3) is not None
assert owl.create_chat_completion(m)["choices"][0]["message"]["content"] is not None
assert api.chat.completions.create(messages=m).choices[0] is not None
assert reply.choices[0].message.content is not None
assert good == 200 and answer["choices"][0]["message"]["content"] is not None
assert isinstance(owl.ask(data, "Q?"), str)
assert store.get("embeds", "key0") is not None
assert refusal(address) is not None
assert chunk.choices[0].delta.content is not None
assert re.match("x", owl.ask(picture, "Q?")) is not None
assert reply.choices[0].message.content == expected
assert owl.ask(picture, "Q?") is None or flag is not None
'''
    assert offences(sample) == [2, 3, 5, 6, 7, 8, 9], offences(sample)
    found = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "tests").glob("*.py"))
             for line in offences(path.read_text(encoding="utf-8"))]
    assert not found, "asserts that hold for any answer (see this test's docstring): " + \
        ", ".join(found)


# --- Code names in the docs -----------------------------------------------------------------------

# Dotted names in the docs that are keys of data, not Python attributes, and that no string
# literal of the sources spells (test_code_names_in_the_docs_exist skips those it finds there):
# llama.cpp's imatrix GGUF keys come from gguf-py, the manifest's recipe fields are nested dicts.
DATA_KEYS = {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size", "recipe.chosen"}
# A dotted name ending in one of these is a file (`owl2.json`, `kv_prefix.py`), not an attribute.
FILE_ENDINGS = {"py", "pyi", "md", "json", "jsonl", "gguf", "onnx", "data", "cpp", "h", "txt",
                "toml", "sh", "so", "jpg", "jpeg", "png", "webp", "csv", "yaml", "yml", "html",
                "js", "css", "log", "whl", "gz", "zip", "tar", "safetensors", "bin", "model"}
_DOTTED = re.compile(r"(?<![\w.\-/:@$])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w\-/])")
# A command line names files, hosts and options, not Python attributes.
_COMMAND_LINE = re.compile(r"^\s*(?:\$ |owl2 |python |pip |uv |curl |hf |git |cmake |-)")


def _python_names() -> tuple[dict, dict]:
    """What owl2_edge (and the converter, installed as owl2_edge.convert) defines, read with ast:
    {module key: its names}, {class name: its names, or None when unknown}.

    A module is known by its dotted path and each tail of it (`owl2_edge.engine.job`,
    `engine.job`, `job`); modules sharing a key (`answer`: answer.py, cli/answer.py,
    serve/answer.py) pool their names. A module's names: its top-level functions, classes and
    assigned names, its `__all__`, and for a package its submodules, its imports (re-exports) and
    what its lazy `__getattr__` hands out. A class's names: its methods and properties, its
    class-level assignments (dataclass fields), every `self.x = ...` in its methods, and its
    owl2_edge bases' names. A class with a base from elsewhere (a Starlette response) may have
    more than these: None, so its members are not checked."""
    closed_bases = {"object", "Exception", "ValueError", "RuntimeError", "Protocol"}
    modules: dict[str, set] = {}
    found: dict[str, list] = {}  # class name -> [(its own names, its bases' names)]

    def assigned(node) -> set:
        nodes = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in nodes for n in ast.walk(t) if isinstance(n, ast.Name)}

    trees = [(p, ("owl2_edge", *p.relative_to(ROOT / "owl2_edge").with_suffix("").parts))
             for p in sorted((ROOT / "owl2_edge").rglob("*.py"))]
    trees += [(p, ("owl2_edge", "convert", *p.relative_to(ROOT / "convert").with_suffix("").parts))
              for p in sorted((ROOT / "convert").rglob("*.py"))]
    for path, parts in trees:
        package = parts[-1] == "__init__"
        parts = parts[:-1] if package else parts
        names: set = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names |= assigned(node)
                if isinstance(node, ast.Assign) and "__all__" in assigned(node):
                    names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
            elif package and isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            if package and isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                names |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)
                          and isinstance(c.value, str) and c.value.isidentifier()}
            if isinstance(node, ast.ClassDef):
                members = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                           and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name)
                           and n.value.id == "self"}
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        members.add(item.name)
                    elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                        members |= assigned(item)
                found.setdefault(node.name, []).append(
                    (members, [ast.unparse(b) for b in node.bases]))
        for i in range(len(parts)):
            modules.setdefault(".".join(parts[i:]), set()).update(names)
        for j in range(1, len(parts)):  # a package's submodules are its names too
            for i in range(j):
                modules.setdefault(".".join(parts[i:j]), set()).add(parts[j])

    classes: dict[str, set | None] = {}

    def members_of(name: str, seen: tuple = ()) -> set | None:
        if name not in classes:
            result: set = set()
            for members, bases in found[name]:
                result |= members
                for base in bases:
                    if base in found and base not in seen:
                        more = members_of(base, (*seen, name))
                    else:
                        more = set() if base in closed_bases else None
                    if more is None:
                        classes[name] = None
                        return None
                    result |= more
            classes[name] = result
        return classes[name]

    for name in found:
        members_of(name)
    return modules, classes


def _string_literals() -> str:
    """Every string literal of the Python sources (f-strings' constant parts too), one a line."""
    literals = set()
    for folder in ("owl2_edge", "convert"):
        for path in (ROOT / folder).rglob("*.py"):
            literals |= {n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                         if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return "\n".join(literals)


def _camel_case(word: str) -> bool:
    """A class's name as the code writes one: CamelCase with two capitals at least (`KVPrefix`;
    not `Job`, `W_q` or `Yellow`: one capital, or an underscore, is as likely a word or maths)."""
    return (word.isidentifier() and "_" not in word and word[0].isupper()
            and sum(c.isupper() for c in word) >= 2 and any(c.islower() for c in word))


def _source_words() -> set:
    """Every word of the sources (code, comments and strings of owl2_edge/, convert/, cpp_ext/,
    tests/, benchmarks/ and scripts/; this file aside, whose sample names classes that are not)."""
    return {word for folder in ("owl2_edge", "convert", "cpp_ext", "tests", "benchmarks", "scripts")
            for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".cpp", ".h", ".sh")
            and p != Path(__file__).resolve()
            for word in re.findall(r"\w+", p.read_text(encoding="utf-8"))}


def _code_spans(text: str):
    """The text of each `code span` of a Markdown page, and each line of its fenced blocks."""
    fence = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
    for block in fence.finditer(text):
        yield from block.group(0).splitlines()[1:-1]
    for span in re.finditer(r"`([^`\n]+)`", fence.sub("", text)):
        yield span.group(1)


def _stale_code_names(docs: dict[str, str]) -> tuple[int, list[str]]:
    """(how many names were checked, "page: `name`" for each missing one) over {page: its text}:
    the rules are test_code_names_in_the_docs_exist's."""
    modules, classes = _python_names()
    # The native extension (cpp_ext/bindings.cpp) is no Python source: its names are unknown.
    for native in re.findall(r"NB_MODULE\((\w+)", (ROOT / "cpp_ext" / "bindings.cpp").read_text(
            encoding="utf-8")):
        modules["owl2_edge"].add(native)
        modules[native] = modules[f"owl2_edge.{native}"] = None
    cpp_structs = {m.group(1) for p in (ROOT / "cpp_ext").glob("*.[ch]*")
                   for m in re.finditer(r"^struct (\w+)", p.read_text(encoding="utf-8"), re.M)}
    literals, words = _string_literals(), _source_words()
    # A library the docs' own snippets import (`import ollama`) is what its name means there,
    # even where an owl2_edge module has the same name (serve/ollama.py).
    libraries = {m.group(1) for text in docs.values()
                 for m in re.finditer(r"^\s*(?:import|from)\s+(\w+)", text, re.M)} - {"owl2_edge"}

    def exists(parts: list[str]) -> bool | None:
        """Whether the name exists; None when it is not one this test can judge."""
        if parts[0] in libraries:
            return None
        k = max((k for k in range(1, len(parts)) if ".".join(parts[:k]) in modules), default=0)
        if k:
            names = modules[".".join(parts[:k])]
            if names is None or k == 1 and (
                    parts[0] in cpp_structs or ".".join(parts) in DATA_KEYS
                    or re.search(rf"(?<![\w.]){re.escape('.'.join(parts[:2]))}(?!\w)", literals)):
                return None
            names = set(names)
            twin = next((c for c in classes if k == 1 and c.lower() == parts[0]), None)
            if twin is not None:
                if classes[twin] is None:
                    return None
                names |= classes[twin]
            if parts[k] not in names:
                return False
            rest = parts[k + 1:]
            if rest and classes.get(parts[k]) is not None:
                return rest[0] in classes[parts[k]]
            return True
        owner = "Owl2" if parts[0] == "owl" else parts[0]
        if owner in classes:
            return None if classes[owner] is None else parts[1] in classes[owner]
        # A class name no source mentions at all is a class that is gone (`KVPrefix.prefill`).
        return False if owner[0].isupper() and owner not in words else None

    checked, missing = 0, []
    for page, text in docs.items():
        for span in _code_spans(text):
            if _COMMAND_LINE.match(span):
                continue
            if _camel_case(span) and span not in classes:
                checked += 1  # a class name alone: gone when no source mentions it
                if span not in words:
                    missing.append(f"{page}: `{span}`")
            for m in _DOTTED.finditer(span):
                parts = m.group(1).split(".")
                if parts[-1] in FILE_ENDINGS or (verdict := exists(parts)) is None:
                    continue
                checked += 1
                if not verdict:
                    missing.append(f"{page}: `{m.group(1)}`")
    return checked, list(dict.fromkeys(missing))


def test_code_names_in_the_docs_exist():
    """Every code name the docs (docs/*.md, README.md) write in backticks exists in the code.

    A name is checked when it is dotted and its first part is an owl2_edge module
    (`kv_prefix.common_prefix`, `engine.scheduler`, `owl2_edge.engine.job.Job`) or a class
    defined in owl2_edge (`Owl2.prepare`, `Job.poll`); _python_names says what counts as a
    module's or a class's name, and a chain is followed into a class one level deep
    (`job.Job.poll`). A lowercase first part that is a module and also a class's name in lower
    case (`stats`/`Stats`, `answer`/`Answer`, `job`/`Job`) is how the docs name an instance, so
    the attribute may be either's (`stats.reused_positions`). `owl.x` is checked against Owl2:
    the docs call an Owl2 `owl` and nothing else. A CamelCase name that is no class of owl2_edge
    (`KVPrefix.prefill`, or `RequestQueue` alone) fails when no source file (code, comment or
    string) mentions it at all: a class that is gone. Fenced blocks are read line by line.

    Not checked, so that it raises no false alarm: other instance names (`pieces.stats`: their
    type is written nowhere), the native extension's names (`_decoder.Decoder`), a first part
    that is also a C++ struct of cpp_ext/ (`run`, `model`), file names (`owl2.json`), command
    lines (their hosts: `owl.example.com`), and keys of data the code reads or writes, which a
    string literal of the sources spells (`owl2.pair_id`, `output.weight`,
    `chat.completion.chunk`) or DATA_KEYS lists."""
    # The scan itself can fail: it flags a missing member, and none of the names it must leave.
    sample = """`Owl2.prepare` `Owl2.no_such` `kv_prefix.common_prefix` `kv_prefix.KVPrefix`
`owl2_edge.engine.job.Job.poll` `engine.job.Job.no_such` `stats.reused_positions` `owl.stats`
`owl.no_such` `KVPrefix.prefill` `RequestQueue` `StreamingResponse` `Llama.eval` `Yellow`
`owl2.json` `owl2.pair_id` `_decoder.Decoder.eval_runs` `pieces.stats` `Engine`
```
owl2 serve --host-allow owl.example.com
text = owl.ask_all("photo.jpg", "?")
```
"""
    checked, missing = _stale_code_names({"sample": sample})
    assert missing == ["sample: `owl.ask_all`", "sample: `Owl2.no_such`",
                       "sample: `kv_prefix.KVPrefix`", "sample: `engine.job.Job.no_such`",
                       "sample: `owl.no_such`", "sample: `KVPrefix.prefill`",
                       "sample: `RequestQueue`"], missing
    assert checked == 13, checked
    docs = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for p in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]}
    checked, missing = _stale_code_names(docs)
    assert checked > 150, checked  # the scan found the docs' names at all
    assert not missing, "code names in the docs that the code does not have: " + \
        ", ".join(missing)
