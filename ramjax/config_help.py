"""`ramjax COMMAND --help`: the fields of the chosen config with their values and a one-line description.

Descriptions come from the config file's own comments: the comment at the end of the line that sets a field,
or else the comment block just above it when that names the field. Fields are matched to those lines by their last two names
("ramnet.top_k" in `m.ramnet.top_k = 8  # K`), then by their last name when that is unique in the file.
"""

from __future__ import annotations

import re

# `target.path = value  # comment` (the target may be a local alias such as `m` or `d`).
_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s*#\s*(.*)$")


def field_comments(source: str) -> dict[str, str]:
    """'parent.leaf' and 'leaf' -> the comment describing the first assignment to that field in `source` (its
    end-of-line comment, else the comment block right above it when that names the field, up to its first
    full stop)."""
    by_pair: dict[str, str] = {}
    by_leaf: dict[str, list[str]] = {}
    block: list[str] = []
    for line in source.splitlines():
        comment_line = _COMMENT.match(line)
        if comment_line:
            block.append(comment_line.group(1))
            continue
        match = _ASSIGNMENT.match(line)
        if match and "(" not in match.group(1):
            names = match.group(1).split(".")
            text = match.group(3) or _block_about(block, names[-1])
            if len(names) >= 2:
                by_pair.setdefault(".".join(names[-2:]), text)  # the first assignment describes the field
                by_leaf.setdefault(names[-1], []).append(text)
        block = []
    said = {leaf: {t for t in texts if t} for leaf, texts in by_leaf.items()}
    unique = {leaf: texts.pop() for leaf, texts in said.items() if len(texts) == 1}
    return {**unique, **by_pair}  # a pair seen without a comment stays "" (its leaf's comment may be another's)


def _block_about(block: list[str], leaf: str) -> str:
    """A comment block above an assignment describes the field only if it names it (else it is about the code
    that follows, as "# The small Figure-4 regime" is): its first sentence then."""
    text = " ".join(block)
    mentioned = leaf.lower() in text.lower() or leaf.replace("_", " ").lower() in text.lower()
    return _first_sentence(text) if mentioned else ""


def _first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head + ("." if dot else "")


def flatten(config, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted field, value) for every leaf of an ml-collections config, in order."""
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and not isinstance(value, (str, bytes)):
            rows += flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def describe_fields(config, source: str) -> str:
    """One line per field: name = value, and its description where the config file has one."""
    comments = field_comments(source)
    rows = flatten(config)
    width = min(max(len(f"{name} = {value!r}") for name, value in rows), 60)
    lines = []
    for name, value in rows:
        parts = name.split(".")
        pair = ".".join(parts[-2:])
        text = comments[pair] if pair in comments else comments.get(parts[-1], "")
        left = f"{name} = {value!r}"
        lines.append(f"  {left:{width}s}  {text}".rstrip())
    return "\n".join(lines)
