"""A Griffe extension that lets mkdocstrings render trajflow's docstring conventions.

trajflow's docstrings follow zuko's habits, which Griffe's Google parser does not read:

* Sphinx roles such as ``:class:`Coupling` `` or ``:meth:`~trajflow.core.Block.inverse` ``
  become optional cross-references: a link when the target is rendered on some page, plain
  code otherwise (never a warning);
* ``Example:`` headings become ``Examples:``, so their doctests render as code blocks;
* ``#:`` comments above an attribute become that attribute's docstring.

It only rewrites what mkdocstrings renders; the source files are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|obj|exc|const):`(~?)([\w.]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


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


class TrajflowDocstrings(griffe.Extension):
    """Rewrites the docstrings of every trajflow object once the tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or not obj.path.startswith("trajflow"):
            return
        if obj.docstring is None and obj.is_attribute:
            text = _comment_docstring(obj)
            if text is not None:
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, obj.docstring.value)
