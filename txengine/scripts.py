"""Revision scripts: render them with Jinja2, load data scripts with ``ast``, import code.

A data revision's script is *derived* from its payload, for display, export and
review; sync ships payloads, never text. Loading it back reads literals with
``ast`` and never executes anything, so a script from anywhere is safe to read,
and re-encoding the literals gives back the payload's exact bytes, so any edit
shows up as a checksum mismatch. Authored script revisions are real code: their
header is read with ``ast`` (listing ``versions/`` executes nothing) and only
:meth:`AuthoredScript.module` runs them.
"""

from __future__ import annotations

import ast
import datetime as _dt
import functools
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
import rfc8785

from .exceptions import InvalidInput, MalformedPayload, NonLiteralScript
from .revision import FIELDS, Revision, build, check_descriptor, check_id, decode_ops
from .values import canonical

DATA_MARKER = "# txengine: data revision"
"""The line that tells a rendered data script apart from authored code in ``versions/``."""

_OP_POSITIONAL = {"insert": ("collection", "doc"), "update": ("collection", "key"),
                  "delete": ("collection", "key")}
_OP_KWARGS = {"insert": ("cas",), "update": ("set", "unset", "inc", "expect", "before", "cas"),
              "delete": ("expect", "before", "cas")}
_DATA_HEADERS = ("revision", "down_revision", "branch_labels", "depends_on", "descriptor")
_AUTHORED_HEADERS = ("revision", "down_revision", "branch_labels", "depends_on", "txengine")
_TXENGINE_KEYS = ("hlc", "origin", "seq", "partition", "stores")
#: Optional frozen keys: ``depends_on`` holds resolved ids when an adopted Alembic
#: script's ``depends_on`` names branch labels (Alembic resolves them at load time).
_TXENGINE_OPTIONAL = ("partition", "depends_on")
_HEADER_LINE = re.compile(r"^revision\s*(:[^=\n]*)?=", re.MULTILINE)
_SLUG = re.compile(r"\w+")
SLUG_LENGTH = 40
_MAX_JSON_INT = 2**53 - 1
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


# -- templates ------------------------------------------------------------------------

def _template_source(name: str) -> str:
    """Read a template from the installed package, or from the source tree when not installed."""
    try:
        root: Any = importlib.resources.files("txengine.templates")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent / "templates"
    return str((root / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """Build the template environment; the filters turn values into Python source."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source), keep_trailing_newline=True,
        autoescape=False, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        py=_py, doc=functools.partial(_py_str, docstring=True), hlc=_hlc_text,
        down_revision=functools.partial(_ids_literal, single=True),
        ids=functools.partial(_ids_literal, single=False),
    )
    return env


# -- Python literals --------------------------------------------------------------------

def _py_str(text: str, docstring: bool = False) -> str:
    """Return ``text`` as a double-quoted literal, escaping whatever is not printable.

    Escaping every non-printable character (including U+2028 and friends) keeps the
    file's lines the script's lines. In a docstring, newlines stay newlines.
    """
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text if docstring else f'"{text}"'
    out = []
    for ch in text:
        if ch == "\n" and docstring:
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100
                       else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    body = "".join(out)
    return body if docstring else f'"{body}"'


def _py(value: Any) -> str:
    """Render a JSON value as a Python literal, keeping dict order (the payload's)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return _py_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_str(k)}: {_py(v)}" for k, v in value.items()) + "}"
    raise MalformedPayload(f"cannot render a value of type {type(value).__name__}")


def _ids_literal(ids: Sequence[str], single: bool) -> str:
    """Render ids as Alembic does: None, a string (one parent) or a tuple."""
    if not ids:
        return "None"
    if single and len(ids) == 1:
        return _py_str(ids[0])
    return "(" + ", ".join(_py_str(i) for i in ids) + ("," if len(ids) == 1 else "") + ")"


def _call(item: dict[str, Any]) -> str:
    """Render one op's JSON as ``op.<name>(...)``, with only the kwargs it holds."""
    name = item["op"]
    args = [_py(item[a]) for a in _OP_POSITIONAL[name]]
    args += [f"{k}={_py(item[k])}" for k in _OP_KWARGS[name] if k in item]
    return f"op.{name}({', '.join(args)})"


def _hlc_text(hlc: list[int]) -> str:
    ms, counter = hlc
    try:
        when = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(milliseconds=ms)
    except OverflowError:
        return f"{ms}/{counter}"
    return f"{ms}/{counter} ({when.strftime('%Y-%m-%dT%H:%M:%S.')}{ms % 1000:03d}Z)"


def render_data(revision: Revision) -> str:
    """Render a data revision as a Python module readable like an Alembic migration.

    Values come from the canonical payload, so the same revision always renders
    to the same bytes; the downgrade is derived from the ops' inverses.
    """
    d = revision.descriptor
    if d.get("kind") != "data":
        raise InvalidInput(f"revision {str(d.get('id'))[:12]} is a {d.get('kind')!r} revision;"
                           " only data revisions render from their payload")
    ops = revision.ops  # decoding checks the payload before anything is rendered
    items = json.loads(revision.payload)
    irreversible = ""
    downgrades = []
    try:
        for op in reversed(ops):
            downgrades.append(_call(json.loads(canonical(op.inverse().to_json()))))
    except InvalidInput as exc:
        irreversible = _py_str(str(exc), docstring=True).replace("\n", " ")
    fields = [k for k in FIELDS if k in d] + sorted(set(d) - set(FIELDS))
    descriptor = "{\n" + "".join(f"    {_py_str(k)}: {_py(d[k])},\n" for k in fields) + "}"
    return _environment().get_template("data_revision.py.jinja2").render(
        d=d, marker=DATA_MARKER, descriptor=descriptor, upgrades=[_call(i) for i in items],
        downgrades=downgrades, irreversible=irreversible,
    )


# -- loading data scripts with ast --------------------------------------------------------

def _refuse(path: str, node: ast.AST | None, reason: str) -> NonLiteralScript:
    return NonLiteralScript(path, getattr(node, "lineno", 1), reason)


_LITERAL_NODES = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.UnaryOp, ast.unaryop,
                  ast.expr_context)


def _describe(node: ast.AST) -> str:
    """Say what makes ``node`` non-literal, naming its first non-literal part."""
    node = next((n for n in ast.walk(node) if not isinstance(n, _LITERAL_NODES)), node)
    if isinstance(node, ast.Name):
        return f"name {node.id!r} is not a literal"
    if isinstance(node, ast.JoinedStr):
        return "f-string is not a literal"
    if isinstance(node, ast.Call):
        return f"call to {ast.unparse(node.func)} is not a literal"
    if isinstance(node, ast.Tuple):
        return "tuple is not a JSON literal (use a list)"
    return f"{type(node).__name__} expression is not a literal"


def _float_text(value: int) -> bool:
    try:
        return rfc8785.dumps(float(value)) == str(value).encode()
    except (OverflowError, rfc8785.CanonicalizationError):
        return False


def _json_value(node: ast.AST, path: str) -> Any:
    """Convert a literal node to JSON; stricter than ``literal_eval`` (no tuples, sets, bytes)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if type(value) is int and abs(value) > _MAX_JSON_INT and _float_text(value):
            # Canonical JSON writes a big integral float (1e20) without a fraction, so
            # it reads back as an int that RFC 8785 refuses; as a float it encodes to
            # the very same digits.
            return float(value)
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float) and value - value == 0:
            return value
        raise _refuse(path, node, f"{value!r} is not a JSON literal")
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        return -_json_value(node.operand, path)
    if isinstance(node, ast.List):
        return [_json_value(e, path) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                raise _refuse(path, v, "** unpacking is not a literal")
            key = _json_value(k, path)
            if not isinstance(key, str):
                raise _refuse(path, k, f"dict key {key!r} is not a string")
            if key in out:
                raise _refuse(path, k, f"dict key {key!r} appears twice")
            out[key] = _json_value(v, path)
        return out
    raise _refuse(path, node, _describe(node))


def _op_calls(func: ast.FunctionDef, path: str) -> list[dict[str, Any]]:
    """Return the op JSON of a function body made only of literal ``op.*`` calls."""
    a = func.args
    if (func.decorator_list or func.returns or a.posonlyargs or a.vararg or a.kwonlyargs
            or a.kwarg or a.defaults or [x.arg for x in a.args] != ["op"]):
        raise _refuse(path, func, f"{func.name} must be declared as `def {func.name}(op):`")
    items = []
    for stmt in func.body:
        if isinstance(stmt, ast.Pass):
            continue
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            raise _refuse(path, stmt, f"{type(stmt).__name__} statement is not an op call")
        call, target = stmt.value, stmt.value.func
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "op"):
            raise _refuse(path, call, f"call to {ast.unparse(target)} is not an op call")
        name = target.attr
        if name not in _OP_KWARGS:
            raise _refuse(path, call, f"unknown op method op.{name}")
        if len(call.args) != 2:
            raise _refuse(path, call, f"op.{name} takes 2 positional arguments")
        item: dict[str, Any] = {"op": name}
        for field, arg in zip(_OP_POSITIONAL[name], call.args, strict=True):
            item[field] = _json_value(arg, path)
        for kw in call.keywords:
            if kw.arg not in _OP_KWARGS[name]:
                raise _refuse(path, kw, f"op.{name} takes no keyword {kw.arg or '**'!r}")
            item[kw.arg] = _json_value(kw.value, path)
        items.append(item)
    return items


def _parse(text: str, path: str) -> ast.Module:
    try:
        return ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise NonLiteralScript(path, exc.lineno or 1, f"syntax error: {exc.msg}") from exc


def header_ids(value: Any, line: int, name: str, path: str) -> tuple[str, ...]:
    """Normalize an Alembic-style id header (None, a string, a tuple or list) to a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise MalformedPayload(f"{path}:{line}: header {name} must be None, a string or a tuple"
                           f" of strings, got {value!r}")


def _data_header(found: dict[str, ast.Assign], descriptor: dict[str, Any], path: str) -> None:
    """Refuse Alembic header names that disagree with the descriptor they are drawn from."""
    expected = {"revision": (descriptor.get("id"),), "down_revision": descriptor.get("parents"),
                "branch_labels": descriptor.get("branch_labels"),
                "depends_on": descriptor.get("depends_on")}
    for name, want in expected.items():
        if name in found:
            node = found[name]
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                raise _refuse(path, node.value, _describe(node.value)) from None
            if header_ids(value, node.lineno, name, path) != tuple(want or ()):
                raise _refuse(path, node, f"header {name} does not match the descriptor")


def load_data(text: str, path: str = "<script>") -> Revision:
    """Read a rendered data script back into the revision it was rendered from.

    Only literals are read (nothing is executed), and the payload is re-encoded
    canonically, so an untouched script gives the original bytes and an edited
    one fails ``verify()`` with a checksum mismatch.
    """
    tree = _parse(text, path)
    found: dict[str, ast.Assign] = {}
    funcs: dict[str, ast.FunctionDef] = {}
    for index, stmt in enumerate(tree.body):
        if (index == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)):
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            raise _refuse(path, stmt, "import statement")
        if isinstance(stmt, ast.Assign):
            target = stmt.targets[0] if len(stmt.targets) == 1 else None
            name = target.id if isinstance(target, ast.Name) else ast.unparse(stmt.targets[0])
            if name not in _DATA_HEADERS:
                raise _refuse(path, stmt, f"assignment to {name} is not allowed")
            if name in found:
                raise _refuse(path, stmt, f"{name} is assigned twice")
            found[name] = stmt
        elif isinstance(stmt, ast.FunctionDef) and stmt.name in ("upgrade", "downgrade"):
            if stmt.name in funcs:
                raise _refuse(path, stmt, f"{stmt.name} is defined twice")
            funcs[stmt.name] = stmt
        else:
            raise _refuse(path, stmt, f"{type(stmt).__name__} statement is not allowed")
    if "descriptor" not in found:
        raise NonLiteralScript(path, 1, "missing descriptor")
    if "upgrade" not in funcs:
        raise NonLiteralScript(path, 1, "missing upgrade function")
    descriptor = _json_value(found["descriptor"].value, path)
    if not isinstance(descriptor, dict) or descriptor.get("kind") != "data":
        raise _refuse(path, found["descriptor"], "descriptor is not a data revision's")
    check_descriptor(descriptor)
    _data_header(found, descriptor, path)
    items = _op_calls(funcs["upgrade"], path)
    if "downgrade" in funcs:
        _op_calls(funcs["downgrade"], path)
    payload = canonical(items)
    decode_ops(payload)
    return Revision(descriptor, payload)


# -- authored script revisions -----------------------------------------------------------

@dataclass(frozen=True)
class AuthoredScript:
    """An authored script revision in ``versions/``: its file, text and frozen descriptor."""

    path: Path
    text: str
    revision: Revision
    stores: tuple[str, ...]

    def module(self) -> ModuleType:
        """Execute the script and return it as a module exposing ``upgrade``/``downgrade``.

        The checksummed text is what runs, not whatever the file holds by now, and
        each call gets a fresh module under a unique name (scripts are not cached
        in ``sys.modules``, so two versions directories never collide).
        """
        name = f"txengine_script_{self.revision.id}_{self.revision.descriptor['checksum'][:12]}"
        spec = importlib.util.spec_from_file_location(name, self.path)
        if spec is None:
            raise MalformedPayload(f"{self.path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        exec(compile(self.text, str(self.path), "exec"), module.__dict__)  # noqa: S102
        for func in ("upgrade", "downgrade"):
            if not callable(getattr(module, func, None)):
                raise MalformedPayload(f"{self.path}: script revision has no {func}(op) function")
        return module


def slug(message: str) -> str:
    """Return the file-name slug of a message, the way Alembic makes it."""
    text = "_".join(_SLUG.findall(message or "")).lower()
    if len(text) > SLUG_LENGTH:
        text = text[:SLUG_LENGTH].rsplit("_", 1)[0] + "_"
    return text


def script_filename(rev_id: str, message: str) -> str:
    """Return Alembic's default file name for a revision: ``<rev>_<slug>.py``."""
    return f"{rev_id}_{slug(message)}.py"


def render_authored(
    *, rev_id: str, message: str, parents: Sequence[str], branch_labels: Sequence[str],
    depends_on: Sequence[str], hlc: tuple[int, int], origin: str, seq: int,
    stores: Sequence[str], partition: str = "default", create_date: _dt.datetime | str,
) -> str:
    """Render a new script revision with Alembic's header plus the frozen ``txengine`` literal."""
    for ref in (rev_id, *parents, *depends_on):
        check_id(ref)
    if not stores or not all(isinstance(s, str) and s for s in stores):
        raise InvalidInput(
            f"a script revision must name the store kinds it runs on, got {stores!r}")
    frozen = {"hlc": [hlc[0], hlc[1]], "origin": origin, "seq": seq, "partition": partition,
              "stores": list(stores)}
    return _environment().get_template("script_revision.py.jinja2").render(
        rev_id=rev_id, message=message, parents=list(parents), branch_labels=branch_labels,
        depends_on=depends_on, create_date=str(create_date), txengine=frozen,
    )


def read_header(tree: ast.Module, path: str, names: Collection[str] = _AUTHORED_HEADERS
                ) -> dict[str, tuple[Any, int, int]]:
    """Read top-level header assignments as literals, executing nothing.

    Returns ``{name: (value, first line, last line)}``; also used to adopt
    Alembic migrations, whose headers are the same assignments.
    """
    found: dict[str, tuple[Any, int, int]] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if not isinstance(target, ast.Name) or target.id not in names:
            continue
        if target.id in found:
            raise MalformedPayload(f"{path}:{stmt.lineno}: header {target.id} is assigned twice")
        try:
            found[target.id] = (ast.literal_eval(value), stmt.lineno,
                                stmt.end_lineno or stmt.lineno)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise MalformedPayload(f"{path}:{stmt.lineno}: header {target.id} must be a literal:"
                                   f" {_describe(value)}") from None
    return found


def _frozen(value: Any, path: str, line: int) -> dict[str, Any]:
    """Check the ``txengine = {...}`` keys and stores; :func:`build` users check the rest."""
    required = set(_TXENGINE_KEYS) - set(_TXENGINE_OPTIONAL)
    allowed = set(_TXENGINE_KEYS) | set(_TXENGINE_OPTIONAL)
    if not isinstance(value, dict) or not required <= set(value) <= allowed:
        raise MalformedPayload(f"{path}:{line}: header txengine must be a dict with the keys"
                               f" {', '.join(_TXENGINE_KEYS)} (partition is optional)")
    stores, hlc = value["stores"], value["hlc"]
    if (not isinstance(stores, (list, tuple)) or not stores
            or not all(isinstance(s, str) and s for s in stores)):
        raise MalformedPayload(f"{path}:{line}: header txengine stores must be a non-empty list"
                               f" of store kinds, got {stores!r}")
    if not isinstance(hlc, (list, tuple)) or len(hlc) != 2:
        raise MalformedPayload(f"{path}:{line}: header txengine hlc must be [ms, counter]")
    return {"partition": "default", **value}


def load_authored(path: Path) -> AuthoredScript:
    """Read a script revision's header with ``ast`` and build its frozen revision.

    The payload is the file's bytes, so the checksum covers the code that runs;
    the descriptor depends only on the header, so every peer gets the same one.
    """
    return parse_authored(path.read_bytes(), path)


def parse_authored(payload: bytes, path: Path) -> AuthoredScript:
    """Build an authored script from its bytes (a file's, or a signed revision's payload
    that arrived by sync: ``path`` then only names it in messages)."""
    where = str(path)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"{where}: a script revision must be UTF-8 ({exc})") from exc
    if DATA_MARKER in text.splitlines():
        raise MalformedPayload(f"{where}: is a rendered data revision; read it with load_data")
    tree = _parse(text, where)
    header = read_header(tree, where)
    for name in ("revision", "txengine"):
        if name not in header:
            raise MalformedPayload(f"{where}: script revision has no {name} = ... header")
    refs = {name: header_ids(*header.get(name, (None, 1, 1))[:2], name, where)
            for name in ("down_revision", "branch_labels", "depends_on")}
    frozen = _frozen(header["txengine"][0], where, header["txengine"][1])
    if "depends_on" in frozen:
        refs["depends_on"] = header_ids(frozen["depends_on"], header["txengine"][1],
                                         "txengine depends_on", where)
    doc = (ast.get_docstring(tree) or "").strip()
    try:
        for ref in (header["revision"][0], *refs["down_revision"], *refs["depends_on"]):
            check_id(ref)
        revision = build(
            kind="script", rev_id=header["revision"][0], payload=payload,
            parents=list(refs["down_revision"]), depends_on=list(refs["depends_on"]),
            branch_labels=list(refs["branch_labels"]), hlc=(frozen["hlc"][0], frozen["hlc"][1]),
            origin=frozen["origin"], seq=frozen["seq"], partition=frozen["partition"],
            message=doc.splitlines()[0] if doc else "",
        )
        check_descriptor(revision.descriptor)
    except MalformedPayload as exc:
        raise MalformedPayload(f"{where}: {exc}") from None
    return AuthoredScript(path, text, revision, tuple(frozen["stores"]))


def scan_versions(directory: Path) -> list[tuple[Path, bytes]]:
    """Return each authored script file in ``directory`` with its bytes, parsing nothing.

    Opening a peer hashes these and parses only the files whose checksum the
    ledger does not know: parsing every header on every command is what makes
    Alembic's ``heads`` slow on long histories.
    """
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.py")):
        if path.name == "__init__.py":
            continue
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        if _HEADER_LINE.search(text) and DATA_MARKER not in text.splitlines():
            found.append((path, data))
    return found


def load_versions(directory: Path) -> list[AuthoredScript]:
    """Load every authored script revision in ``directory``, sorted by file name.

    Files without a ``revision =`` header (helpers) and rendered data scripts are
    skipped; a missing directory holds no revisions. Two files claiming one id
    are refused, since the graph could not tell which one is meant.
    """
    if not directory.is_dir():
        return []
    scripts: list[AuthoredScript] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not _HEADER_LINE.search(text) or DATA_MARKER in text.splitlines():
            continue
        script = load_authored(path)
        if script.revision.id in seen:
            raise MalformedPayload(f"{path}: revision {script.revision.id} is also defined in"
                                   f" {seen[script.revision.id]}; give one of them a new id")
        seen[script.revision.id] = path
        scripts.append(script)
    return scripts
