"""The chart README's values table, made from ``charts/recsys/values.yaml`` and its ``# --`` comments.

Every value in values.yaml carries a ``# --`` comment (helm-docs' convention: the comment block right above
a key, continued on the following ``#`` lines) and appears in the README's table with its default and that
description; ``tests/test_helm.py::test_chart_readme_lists_every_value`` keeps the two equal.

    python -m tests.chart_readme      # rewrite the table in charts/recsys/README.md
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "recsys"
BEGIN, END = "<!-- values:begin (python -m tests.chart_readme) -->", "<!-- values:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?P<rest>.*)$")


@dataclass(frozen=True)
class Value:
    key: str  # dotted path, e.g. redis.tls.enabled
    default: object
    description: str  # "" when the key has no ``# --`` comment


def chart_values(text: str) -> list[Value]:
    """Every leaf of values.yaml in file order: a key whose value is a scalar, a list, or a mapping written
    on its own line (``{cpu: 250m}``, ``{}``). Nested block mappings are walked into, not listed."""
    loaded = yaml.safe_load(text)
    out: list[Value] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings enclosing the current line
    comment: list[str] = []
    in_description = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment, in_description = [stripped[4:].strip()], True
            continue
        if stripped.startswith("#"):
            if in_description:
                comment.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match or stripped.startswith("-"):
            comment, in_description = [], False
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [match["key"]]
        node = loaded
        for part in path:
            node = node[part]
        inline = match["rest"].split(" #")[0].strip() != ""
        if isinstance(node, dict) and not inline:
            if comment:
                raise ValueError(
                    f"{'.'.join(path)}: a `# --` description belongs on a value, not on a mapping"
                )
            stack.append((indent, match["key"]))
        else:
            out.append(Value(".".join(path), node, " ".join(comment)))
        comment, in_description = [], False
    return out


def table(values: list[Value]) -> str:
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for value in values:
        default = json.dumps(value.default, ensure_ascii=False)
        description = value.description.replace("|", "\\|")
        rows.append(f"| `{value.key}` | `{default}` | {description} |")
    return "\n".join(rows)


def readme_with_table(readme: str, values: list[Value]) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table(values)}\n{END}{tail}"


def main() -> None:
    readme = CHART / "README.md"
    values = chart_values((CHART / "values.yaml").read_text())
    readme.write_text(readme_with_table(readme.read_text(), values))
    print(f"wrote {len(values)} values to {readme}")


if __name__ == "__main__":
    main()
