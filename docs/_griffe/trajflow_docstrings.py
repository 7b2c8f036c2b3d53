"""A Griffe extension that lets mkdocstrings render trajflow's docstring conventions.

trajflow's docstrings follow zuko's habits, which Griffe's Google parser does not read:

* Sphinx roles such as ``:class:`Coupling` `` or ``:meth:`~trajflow.core.Block.inverse` ``
  become optional cross-references: a link when the target is rendered on some page, plain
  code otherwise (never a warning);
* ``Example:`` headings become ``Examples:``, so their doctests render as code blocks;
* ``#:`` comments above an attribute become that attribute's docstring, and so does the
  ``description=`` of a pydantic ``Field(...)`` (e.g. the fields of ``ScheduleConfig``);
* ``Args:`` entries that document several parameters at once, as ``y, y_mask: ...`` or
  ``dim: Width. layers: Depth.``, become one entry per parameter (``y_mask: See y.``), so
  that Griffe neither warns about a parameter ``y, y_mask`` nor hides ``layers`` inside
  ``dim``'s description.

It only rewrites what mkdocstrings renders; the source files are untouched.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|obj|exc|const):`(~?)([\w.]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)
_SECTION = re.compile(r"^(\s*)(?:Args|Arguments|Parameters):\s*$")
_ENTRY = re.compile(r"^(\s*)([\w*]+(?:, [\w*]+)*): ?(.*)$")


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj``'s scope, or ``target`` itself."""
    if target.startswith("trajflow."):
        return target
    head, _, rest = target.partition(".")
    try:
        full = obj.resolve(head)
    except Exception:  # unresolvable names stay as they are (rendered as code, no link)
        return target
    return f"{full}.{rest}" if rest else full


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match) -> str:
        short, target = match.groups()
        title = target.rsplit(".", 1)[-1] if short else target
        identifier = _resolve(obj, target)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return _EXAMPLE.sub(r"\1Examples:", _ROLE.sub(role, text))


def _parameter_names(obj: griffe.Object) -> set[str]:
    """Names of the parameters a function, or a class's ``__init__``, takes."""
    try:
        return {parameter.name for parameter in obj.parameters}
    except Exception:  # attributes and modules have none; a class may lack __init__
        return set()


def _split_entry(indent: str, head: str, text: str, names: set[str]) -> list[str] | None:
    """``a, b: text`` and ``a: text. b: more`` as separate entries, or None to keep the line."""
    heads = head.split(", ")
    if not set(heads) <= names:
        return None
    # Later parameters documented inside the text: "Width. layers: Depth." or "...; y_mask: it".
    known = "|".join(sorted(map(re.escape, names - set(heads)), key=len, reverse=True))
    pieces = re.split(rf"(?<=[.;]) ({known}): ", text) if known else [text]
    if len(heads) == 1 and len(pieces) == 1:
        return None
    entries = [(heads, pieces[0])]
    entries += [([name], piece) for name, piece in zip(pieces[1::2], pieces[2::2], strict=True)]
    lines = []
    for entry_heads, entry_text in entries:
        entry_text = entry_text.strip()
        if entry_text.endswith(";"):
            entry_text = entry_text[:-1] + "."
        if entry_text[:1].isascii():  # "its token mask" -> "Its ..."; never λ -> Λ
            entry_text = entry_text[:1].upper() + entry_text[1:]
        first, *others = entry_heads
        lines.append(f"{indent}{first}: {entry_text}")
        lines += [f"{indent}{name}: See ``{first}``." for name in others]
    return lines


def _split_parameters(obj: griffe.Object, text: str) -> str:
    """Rewrites ``Args:`` entries that document several parameters, see the module docstring."""
    names = _parameter_names(obj)
    if not names:
        return text
    lines, out = text.splitlines(), []
    section_indent = None  # indentation of the current Args: header, None outside one
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        entry = _ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            continue
        # Continuation lines (indented deeper) belong to the entry's text.
        continuation = []
        while (
            index < len(lines)
            and lines[index].strip()
            and len(lines[index]) - len(lines[index].lstrip()) > indent
        ):
            continuation.append(lines[index].strip())
            index += 1
        text_of_entry = " ".join([entry.group(3), *continuation]).strip()
        split = _split_entry(entry.group(1), entry.group(2), text_of_entry, names)
        if split is None:
            out.append(line)
            out.extend(lines[index - len(continuation) : index])
        else:
            out.extend(split)
    return "\n".join(out)


def _comment_docstring(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute, joined, or None."""
    if not obj.lineno or isinstance(obj.filepath, list):  # namespace packages have no file
        return None
    try:
        lines = obj.lines_collection[obj.filepath]
    except KeyError:
        return None
    comment: list[str] = []
    index = obj.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        comment.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(comment) or None


def _field_description(obj: griffe.Object) -> str | None:
    """The ``description=`` of an attribute assigned a pydantic ``Field(...)``, or None."""
    value = getattr(obj, "value", None)
    if value is None:
        return None
    try:
        call = ast.parse(str(value), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Field"):
        return None
    for keyword in call.keywords:
        if keyword.arg == "description" and isinstance(keyword.value, ast.Constant):
            return str(keyword.value.value)
    return None


class TrajflowDocstrings(griffe.Extension):
    """Rewrites the docstrings of every trajflow object once the tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or not obj.path.startswith("trajflow"):
            return
        if obj.docstring is None and obj.is_attribute:
            text = _comment_docstring(obj) or _field_description(obj)
            if text is not None:
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            text = _split_parameters(obj, obj.docstring.value)
            obj.docstring.value = _rewrite(obj, text)
