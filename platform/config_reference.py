"""The job-spec reference in the README, generated from the config models (``flare config-reference``)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from flare.platform.config import JobConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "").replace("NoneType", "None")
    return text[len("Optional[") : -1] + " or None" if text.startswith("Optional[") else text


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key + ".")
            continue
        default = "required" if field.is_required() else json.dumps(field.default, default=str)
        rows.append((key, _type_name(ann), default, field.description or ""))
    return rows


def reference_markdown() -> str:
    """A markdown table of every job-spec key: type, default and meaning."""
    lines = [BEGIN, "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in _rows(JobConfig):
        typ, desc = typ.replace("|", "or"), desc.replace("|", "/")
        lines.append(f"| `{key}` | `{typ}` | `{default}` | {desc} |".replace("`required`", "required"))
    lines.append(END)
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the block between the markers in ``path``; True if it changed."""
    from pathlib import Path

    readme = Path(path)
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + reference_markdown() + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already up to date")
