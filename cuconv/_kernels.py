"""Kernel sources: where the .cu files are, how they are read, and what they export.

A `KernelModule` is one kernels_cu/*.cu file with the template instantiations cuconv
launches from it (one per kernel name and storage type). Both backends compile the
same text: `source()` expands the project's own `#include "..."` lines recursively,
so the text (and therefore every compile cache keyed by it: CuPy's on-disk cache and
the interpret backend's) changes whenever any included header changes.

Kernel parameters travel as one struct of `long long` fields; `params()` reads the
struct's field list from the .cu file itself, so the host never keeps a second copy
of the layout.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np

# Storage dtype name -> the C++ type a kernel template is instantiated with.
CTYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}


def kernels_dir() -> Path:
    """The kernels_cu directory: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cuconv: kernels_cu/ not found next to {here}; the installation is incomplete")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def _expand(path: Path, seen: set[Path], name: str | None = None) -> str:
    """`path`'s text with its project includes inlined, each between #line directives
    naming the file the lines come from (`name`: as the line table should show it)."""
    path = path.resolve()
    if path in seen:  # every project header is #pragma once
        return ""
    seen.add(path)
    name = name or path.name
    text = path.read_text()
    out, last = [], 0
    for m in _INCLUDE.finditer(text):
        header = path.parent / m.group(1)
        if not header.is_file():
            raise FileNotFoundError(f"{path.name}: included header {m.group(1)!r} not found")
        line = text.count("\n", 0, m.end()) + 2
        header_name = os.path.normpath(os.path.join(os.path.dirname(name), m.group(1)))
        inlined = _expand(header, seen, header_name)
        out += [text[last : m.start()], f'#line 1 "{header_name}"\n' if inlined else "", inlined,
                f'\n#line {line} "{name}"\n']
        last = m.end() + 1
    out.append(text[last:])
    return "".join(out)


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def _struct_fields(text: str, name: str, filename: str, _derived: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The `long long` fields of struct `name` in `text`, its single public base's first."""
    if name in _derived:
        raise ValueError(f"{filename}: struct {name} derives from itself")
    matches = re.findall(r"\bstruct\s+" + re.escape(name) + r"\s*(?::\s*(?:public\s+)?(\w+)\s*)?\{(.*?)\};",
                         _strip_comments(text), re.S)
    if not matches:
        raise ValueError(f"{filename}: struct {name} not found")
    if len(matches) > 1:
        raise ValueError(f"{filename}: struct {name} is defined {len(matches)} times")
    base, body = matches[0]
    fields = list(_struct_fields(text, base, filename, _derived + (name,))) if base else []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        if not decl.startswith("long long "):
            raise ValueError(f"{filename}: {name} fields must all be 'long long', got {decl!r}")
        fields += [f.strip() for f in decl[len("long long ") :].split(",")]
    if len(set(fields)) != len(fields):
        raise ValueError(f"{filename}: {_derived[0] if _derived else name} repeats a field: {fields}")
    return tuple(fields)


_CONSTEXPR_INT = re.compile(r"\bconstexpr\s+int\s+([^;{}]*);")
_INT_LITERAL = re.compile(r"([-+]?(?:0[xX][0-9a-fA-F]+|[1-9][0-9]*|0))[uUlL]*")


def _split_top_level(text: str, angles: bool = False) -> list[str]:
    """`text` split at the commas outside parentheses, brackets and braces (and template
    argument lists, with `angles`: for declarations, which hold no comparisons)."""
    opening, closing = "([{<" if angles else "([{", ")]}>" if angles else ")]}"
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in opening
        depth -= ch in closing
        if ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    return parts + [text[last:]]


def _constexpr_ints(text: str) -> dict[str, list[str]]:
    """name -> the value text of every `constexpr int name = value` declarator in `text`
    (`constexpr int A = 1, B = 2;` declares two)."""
    found: dict[str, list[str]] = {}
    for m in _CONSTEXPR_INT.finditer(_strip_comments(text)):
        for declarator in _split_top_level(m.group(1)):
            name, eq, value = declarator.partition("=")
            if eq and re.fullmatch(r"\s*\w+\s*", name):
                found.setdefault(name.strip(), []).append(value.strip())
    return found


_GLOBAL = re.compile(r"\b__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def _kernel_parameters(text: str) -> dict[str, list[tuple[str, ...]]]:
    """kernel name -> the parameter declarations of each `__global__ void name(...)` in `text`."""
    text = _strip_comments(text)
    found: dict[str, list[tuple[str, ...]]] = {}
    for m in _GLOBAL.finditer(text):
        depth, end = 1, m.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        params = [d.strip() for d in _split_top_level(text[m.end() : end - 1], angles=True)]
        found.setdefault(m.group(1), []).append(tuple(d for d in params if d and d != "void"))
    return found


def arity_error(module: "KernelModule", kernel: str, expected: int, given: int) -> TypeError:
    return TypeError(f"{kernel} ({module.filename}) takes the params struct and {expected} array argument"
                     f"{'' if expected == 1 else 's'}, got {given}")


class KernelModule:
    """One .cu file and the kernel instantiations launched from it."""

    def __init__(self, filename: str, kernels: tuple[str, ...], params_struct: str, dtypes=tuple(CTYPES),
                 directory: Path | None = None):
        """`directory` (default kernels_cu/) is for test-only sources, which the compile
        check does not list; modules in kernels_cu/ register themselves."""
        self.filename = filename
        self.kernels = tuple(kernels)
        self.params_struct = params_struct
        self.dtypes = tuple(dtypes)
        self.directory = directory
        if directory is None:
            _REGISTRY[filename] = self

    def name_expression(self, kernel: str, dtype: str) -> str:
        if kernel not in self.kernels:
            raise KeyError(f"{self.filename} has no kernel {kernel!r}")
        return f"{kernel}<{CTYPES[dtype]}>"

    @property
    def name_expressions(self) -> list[str]:
        return [self.name_expression(k, d) for k in self.kernels for d in self.dtypes]

    @functools.cached_property
    def path(self) -> Path:
        return (self.directory or kernels_dir()) / self.filename

    @functools.cached_property
    def _text(self) -> str:
        return f'#line 1 "{self.filename}"\n' + _expand(self.path, set())

    def source(self) -> str:
        """The file with its project headers inlined, read once per process (launches
        stay free of file I/O). Compile caches are keyed by this text, so an edited
        header takes effect in the next process."""
        return self._text

    @functools.cached_property
    def source_hash(self) -> str:
        return hashlib.sha256(self._text.encode()).hexdigest()

    @functools.cached_property
    def param_fields(self) -> tuple[str, ...]:
        """The params struct's field names in memory order: those of its base struct first
        (`struct Conv2dParams : ConvGeometryParams {...}`, looked up in the text with the
        project headers inlined), then its own."""
        return _struct_fields(self.source(), self.params_struct, self.filename)

    @functools.cached_property
    def _constants(self) -> dict[str, list[str]]:
        return _constexpr_ints(self.source())

    def constant(self, name: str) -> int:
        """The value of `constexpr int NAME = <integer literal>;` in the .cu text (project
        headers inlined), so the host reads a kernel constant instead of mirroring it.
        KeyError naming the file if there is no such declaration; ValueError if it is
        declared more than once or its value is not an integer literal."""
        values = self._constants.get(name)
        if not values:
            raise KeyError(f"{self.filename}: no 'constexpr int {name} = ...;'")
        if len(values) > 1:
            raise ValueError(f"{self.filename}: constexpr int {name} is declared {len(values)} times")
        literal = _INT_LITERAL.fullmatch(values[0])
        if literal is None:
            raise ValueError(f"{self.filename}: constexpr int {name} = {values[0]!r} is not an integer literal")
        return int(literal.group(1), 0)

    @functools.cached_property
    def _kernel_parameters(self) -> dict[str, list[tuple[str, ...]]]:
        return _kernel_parameters(self.source())

    def kernel_parameters(self, kernel: str) -> tuple[str, ...]:
        """The parameter declarations of `__global__ void kernel(...)`, read from the .cu
        text once per module: the params struct, then the arrays a launch passes."""
        if kernel not in self.kernels:
            raise KeyError(f"{self.filename} has no kernel {kernel!r}")
        found = self._kernel_parameters.get(kernel, [])
        if len(found) != 1:
            raise ValueError(f"{self.filename}: expected one definition of __global__ void {kernel}(...), "
                             f"found {len(found)}")
        params = found[0]
        if not params or not re.search(r"\b" + re.escape(self.params_struct) + r"\b", params[0]):
            raise ValueError(f"{self.filename}: {kernel}'s first parameter must be the {self.params_struct}, "
                             f"got {params[:1]}")
        return params

    def check_arity(self, kernel: str, arrays: int) -> None:
        """TypeError (naming the kernel, the expected and the given count) unless a launch
        of `kernel` with `arrays` array arguments after the params struct matches its
        parameter list. Both backends call it before anything runs."""
        expected = len(self.kernel_parameters(kernel)) - 1
        if arrays != expected:
            raise arity_error(self, kernel, expected, arrays)

    def params(self, **values: int) -> np.ndarray:
        """The params struct as a C-ordered int64 array (its bytes are the struct)."""
        fields = self.param_fields
        missing, extra = set(fields) - set(values), set(values) - set(fields)
        if missing or extra:
            raise KeyError(f"{self.params_struct}: missing {sorted(missing)}, unknown {sorted(extra)}")
        return np.array([int(values[f]) for f in fields], dtype=np.int64)


_REGISTRY: dict[str, KernelModule] = {}


def registered_modules() -> list[KernelModule]:
    """Every kernels_cu/ KernelModule created so far, by filename (each op module creates
    its own when imported; this loader imports none of them)."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
