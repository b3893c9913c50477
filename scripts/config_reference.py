"""Print the README's configuration reference table from the typed config (tests check the README is current)."""

import typing

from llmcls.config import Config, iter_fields


def _type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(map(str, typing.get_args(tp)))
    if origin is list:
        return "list"
    if origin is typing.Union or "UnionType" in str(origin):
        return _type([a for a in typing.get_args(tp) if a is not type(None)][0]) + " or null"
    return tp.__name__


def table() -> str:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, doc in iter_fields(Config):
        shown = ", ".join(default) if isinstance(default, list) else ("null" if default is None else default)
        if isinstance(shown, str) and len(shown) > 40:
            shown = shown[:37] + "..."
        rows.append(f"| `{key}` | {_type(tp)} | `{shown}` | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
