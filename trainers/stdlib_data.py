"""The built-in datasets: code-search pairs from Python source installed on this machine.

query = the first sentence of a function's (or method's) docstring; document = the function's
source without its docstring; ids come from the qualified name (``module.Class.func``). No
download: the source files are those of the running interpreter (``stdlib``) or of the
third-party packages installed with Negatron itself (``pycode``: numpy, torch, transformers, ray,
pyarrow, ...). Pairs are split by module with a seeded hash, so no function (and no module) is in
two splits; duplicate code and duplicate queries are dropped; dev and test corpora get
docstring-less functions of their own modules as distractors. The output is byte-identical from
run to run in the same environment (``pycode`` records the package versions in dataset.json).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

# Folders of the stdlib that are tests, demos or vendored third-party code.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
               "ensurepip", "pydoc_data", "encodings"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class Function:
    id: str          # qualified name, e.g. "json.decoder.JSONDecoder.decode"
    module: str      # dotted module name
    doc: str         # first sentence of the docstring ("" when none usable)
    code: str        # source without the docstring, dedented


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def iter_source_files(root: Path, under: Path | None = None) -> Iterator[Path]:
    for path in sorted((under or root).rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in _SKIP_PARTS or p.startswith("test_") for p in rel):
            continue
        yield path


def first_sentence(doc: str) -> str:
    """The docstring's first paragraph's first sentence, whitespace-collapsed."""
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    m = _SENTENCE_END.search(para)
    return para[: m.start()].strip() if m else para


def _functions(tree: ast.AST, lines: list[str], module: str) -> Iterator[Function]:
    def visit(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield _function(child, lines, f"{module}.{prefix}{child.name}", module)
                # nested functions are part of their parent's source: not visited

    yield from visit(tree, "")


def _function(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], qualname: str,
              module: str) -> Function:
    doc = ast.get_docstring(node, clean=True) or ""
    start = node.lineno - 1  # the def line (decorators are left out on purpose)
    end = node.end_lineno or node.lineno
    src = lines[start:end]
    if doc and node.body and isinstance(node.body[0], ast.Expr):
        d = node.body[0]
        d_start, d_end = d.lineno - 1 - start, (d.end_lineno or d.lineno) - start
        src = src[:d_start] + src[d_end:]
    code = textwrap.dedent("\n".join(l.rstrip() for l in src)).strip("\n")
    return Function(id=qualname, module=module, doc=first_sentence(doc) if doc else "", code=code)


def extract_functions(root: Path | None = None, packages: list[str] | None = None) -> list[Function]:
    """Every top-level function and method under ``root`` (the stdlib by default; only the
    ``packages`` folders of it when given), in a deterministic order."""
    root = root or stdlib_root()
    out: list[Function] = []
    files = (f for p in packages for f in iter_source_files(root, root / p)) if packages else iter_source_files(root)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        out.extend(_functions(tree, text.splitlines(), _module_name(root, path)))
    return out


def _body_lines(code: str) -> int:
    """Non-blank lines after the signature."""
    lines = [l for l in code.splitlines() if l.strip()]
    sig_end = next((i for i, l in enumerate(lines) if l.rstrip().endswith(":")), 0)
    return len(lines) - sig_end - 1


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def split_of(module: str, seed: int, dev_frac: float, test_frac: float) -> str:
    """Seeded, stable assignment of a module to train/dev/test."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "big") / 2**64
    if h < test_frac:
        return "test"
    if h < test_frac + dev_frac:
        return "dev"
    return "train"


def build_stdlib_dataset(out: str | Path, seed: int = 0, dev_frac: float = 0.1,
                         test_frac: float = 0.3, min_words: int = 5, min_body_lines: int = 3,
                         max_code_chars: int = 4000, distractors_per_query: float = 1.0,
                         root: Path | None = None) -> dict[str, dict[str, int]]:
    """Write train.parquet, dev/ and test/ under ``out``; return counts per split.

    Args:
        out: target folder (created).
        seed: split seed; the same seed on the same interpreter gives byte-identical files.
        dev_frac, test_frac: share of modules for dev and test.
        min_words: drop pairs whose query has fewer words.
        min_body_lines: drop functions whose body has fewer non-blank lines.
        max_code_chars: truncate very long function sources.
        distractors_per_query: distractor documents added to a dev/test corpus per query.
    """
    return write_code_dataset(out, extract_functions(root), seed, dev_frac, test_frac, min_words, min_body_lines,
                              max_code_chars, distractors_per_query)


# pycode: import name -> distribution, the third-party packages a default install of Negatron brings:
# its direct dependencies, then what those require (torch: sympy, networkx, jinja2, fsspec;
# transformers: huggingface_hub; ray[serve]: fastapi, starlette, aiohttp, requests, click;
# matplotlib: pillow, fonttools)
PYCODE_PACKAGES = {"numpy": "numpy", "torch": "torch", "transformers": "transformers", "ray": "ray",
                   "pyarrow": "pyarrow", "pydantic": "pydantic", "yaml": "PyYAML", "tqdm": "tqdm",
                   "matplotlib": "matplotlib", "httpx": "httpx", "psutil": "psutil",
                   "sympy": "sympy", "networkx": "networkx", "jinja2": "Jinja2", "fsspec": "fsspec",
                   "huggingface_hub": "huggingface-hub", "fastapi": "fastapi", "starlette": "starlette",
                   "aiohttp": "aiohttp", "requests": "requests", "click": "click", "PIL": "pillow",
                   "fontTools": "fonttools"}
# inside those packages: vendored code, generated bindings and examples
_PYCODE_SKIP = ("_vendor", "thirdparty", "third_party", "_private/thirdparty_files", "examples", "benchmarks",
                "testing/_internal")


def pycode_sources(packages: list[str] | None = None) -> tuple[Path, list[str], dict[str, str]]:
    """(site-packages folder, the package folders found there, {distribution: version}).

    Packages are looked up in this environment's site-packages (``sysconfig``'s purelib) with their
    distribution's metadata there, not through ``sys.path``, so the result does not depend on what
    the process imported first (Ray, once imported, puts its vendored copies from
    ``ray/thirdparty_files`` ahead of site-packages)."""
    import sysconfig
    from importlib.metadata import distributions

    root = Path(sysconfig.get_paths()["purelib"]).resolve()
    found, versions = [], {}
    for mod, dist in PYCODE_PACKAGES.items():
        if packages is not None and mod not in packages:
            continue
        if not (root / mod / "__init__.py").is_file():
            continue
        d = next(iter(distributions(name=dist, path=[str(root)])), None)
        if d is None:
            continue
        found.append(mod)
        versions[dist] = d.version
    if not found:
        raise RuntimeError(f"pycode: none of the packages is installed in {root}")
    return root, found, versions


def build_pycode_dataset(out: str | Path, seed: int = 0, dev_frac: float = 0.05, test_frac: float = 0.1,
                         min_words: int = 5, min_body_lines: int = 3, max_code_chars: int = 4000,
                         distractors_per_query: float = 1.0,
                         packages: list[str] | None = None) -> dict[str, dict[str, int]]:
    """The second built-in dataset: code-search pairs from the third-party packages installed with
    Negatron (``PYCODE_PACKAGES``, or the ``packages`` among them), with the stdlib dataset's rules;
    ``dataset.json`` records the package versions (the output is a function of them and the seed)."""
    import json
    import platform

    root, packages, versions = pycode_sources(packages)
    funcs = [f for f in extract_functions(root, packages)
             if not any(f"/{s.replace('.', '/')}/" in "/" + f.module.replace(".", "/") + "/" for s in _PYCODE_SKIP)]
    counts = write_code_dataset(out, funcs, seed, dev_frac, test_frac, min_words, min_body_lines, max_code_chars,
                                distractors_per_query)
    info = {"name": "pycode", "seed": seed, "python": platform.python_version(), "packages": versions,
            "counts": counts, "rules": {"dev_frac": dev_frac, "test_frac": test_frac, "min_words": min_words,
                                        "min_body_lines": min_body_lines, "max_code_chars": max_code_chars}}
    (Path(out) / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return counts


def write_code_dataset(out: str | Path, funcs: list[Function], seed: int, dev_frac: float, test_frac: float,
                       min_words: int, min_body_lines: int, max_code_chars: int,
                       distractors_per_query: float) -> dict[str, dict[str, int]]:
    """Pairs, splits and files from extracted functions (the rules of ``build_stdlib_dataset``)."""
    out = Path(out)
    pairs: dict[str, list[Function]] = {"train": [], "dev": [], "test": []}
    distractors: dict[str, list[Function]] = {"train": [], "dev": [], "test": []}
    seen_ids: set[str] = set()
    seen_code: set[str] = set()
    seen_query: set[str] = set()
    for f in funcs:
        if f.id in seen_ids:  # redefinitions under if/else: keep the first
            continue
        seen_ids.add(f.id)
        if _body_lines(f.code) < min_body_lines:
            continue
        code_key = _norm(f.code)
        if code_key in seen_code:
            continue
        seen_code.add(code_key)
        code = f.code[:max_code_chars]
        f = Function(f.id, f.module, f.doc, code)
        split = split_of(f.module, seed, dev_frac, test_frac)
        if len(f.doc.split()) >= min_words:
            q = _norm(f.doc)
            if q in seen_query:  # the same query with two answers is ambiguous: keep the first
                continue
            seen_query.add(q)
            pairs[split].append(f)
        elif not f.doc:
            distractors[split].append(f)

    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    train = pairs["train"]
    counts["train"] = {"pairs": len(train)}
    for split in ("dev", "test"):
        fs = pairs[split]
        n_distract = min(len(distractors[split]), int(round(distractors_per_query * len(fs))))
        # deterministic pick of distractors: by hash of id
        dis = sorted(distractors[split], key=lambda f: hashlib.sha256(f"{seed}:{f.id}".encode()).hexdigest())[:n_distract]
        corpus = sorted(fs + dis, key=lambda f: f.id)
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "queries.parquet", {"query_id": [f"q:{f.id}" for f in fs], "text": [f.doc for f in fs]})
        _write(d / "corpus.parquet", {"doc_id": [f.id for f in corpus], "text": [f.code for f in corpus]})
        _write(d / "qrels.parquet", {"query_id": [f"q:{f.id}" for f in fs], "doc_id": [f.id for f in fs],
                                     "score": pa.array([1] * len(fs), pa.int32())})
        counts[split] = {"queries": len(fs), "corpus": len(corpus), "distractors": len(dis)}
    # last: the quickstart takes an existing train.parquet for a finished dataset
    _write(out / "train.parquet", {
        "query": [f.doc for f in train],
        "positive": [f.code for f in train],
        "query_id": [f"q:{f.id}" for f in train],
        "positive_id": [f.id for f in train],
    })
    return counts


def _write(path: Path, columns: dict) -> None:
    table = pa.table({k: v if isinstance(v, pa.Array) else pa.array(v, pa.string()) for k, v in columns.items()})
    from negatron.cluster.files import write_parquet

    write_parquet(table, path, compression="zstd")  # temp file + rename: a crash leaves no truncated split
