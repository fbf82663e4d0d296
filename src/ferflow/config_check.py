"""Config validation errors a person can act on: one line per problem.

Snakemake's own ``validate`` raises on the first problem and prints it together with the whole
schema (about 1,100 lines for ferflow's). :func:`check_config` runs the same JSON-schema validation
(``jsonschema``, draft 2020-12, the validator Snakemake uses) first and reports every problem as
one line: the key path (``training.epochs``, ``variants[1].heads``), what is wrong, and, for an
unknown key or an unknown value, the closest valid one (``difflib``). The workflow calls it before
Snakemake's ``validate`` (which then only fills in the defaults). No Snakemake import: testable on
its own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = ["ConfigError", "check_config", "config_problems", "load_schema"]


class ConfigError(ValueError):
    """The config does not fit the schema; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  "
                         + "\n  ".join(problems))


def load_schema(path: str | Path) -> dict:
    """The schema file (YAML or JSON; YAML merge keys ``<<:`` resolved), as a dict."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _key_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _closest(word: Any, options: Iterable[Any]) -> str:
    """' (closest valid: 'x')' when one option is close to word, else ''."""
    names = [str(o) for o in options]
    match = difflib.get_close_matches(str(word), names, n=1, cutoff=0.5)
    return f" (closest valid: {match[0]!r})" if match else ""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _allowed_keys(schema: dict) -> list[str]:
    return sorted(schema.get("properties", {}))


_BOUNDS = {
    "minimum": "is below the minimum {}", "exclusiveMinimum": "must be greater than {}",
    "maximum": "is above the maximum {}", "exclusiveMaximum": "must be less than {}",
    "minItems": "has fewer than {} items", "maxItems": "has more than {} items",
    "pattern": "does not match {}", "multipleOf": "is not a multiple of {}",
}


def _resolve(schema: dict, root: dict) -> dict:
    """Follow a local ``$ref`` ('#/definitions/x') to the schema it names."""
    while "$ref" in schema and schema["$ref"].startswith("#/"):
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _branch(schema: dict, root: dict) -> str:
    """A oneOf/anyOf branch in words: 'auto', 'integer, minimum 1, not multipleOf 2'."""
    schema = _resolve(schema, root)
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    kind = schema.get("type", "any value")
    parts = [" or ".join(kind) if isinstance(kind, list) else str(kind)]
    for key, value in schema.items():
        if key in ("type", "description", "default", "properties", "additionalProperties", "items"):
            continue
        if key == "not" and isinstance(value, dict) and len(value) == 1:
            (k, v), = value.items()
            parts.append(f"not {k} {v}")
        elif key == "required":
            parts.append("with keys " + ", ".join(value))
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _describe(error, root: dict) -> list[str]:
    """One line per problem for a jsonschema ValidationError (``oneOf``/``anyOf``: the best branch)."""
    from jsonschema.exceptions import best_match

    where = _key_path(error.absolute_path)
    kind, value, schema = error.validator, error.instance, error.schema
    if kind in ("oneOf", "anyOf") and error.context:
        # The branch that got furthest (deepest path) says most: e.g. a wrong `format` inside the
        # object branch of `pretrained`, rather than "is not of type 'null'".
        deepest = max(len(e.absolute_path) for e in error.context)
        if deepest > len(error.absolute_path):
            return _describe(best_match(e for e in error.context if len(e.absolute_path) == deepest), root)
        return [f"{where}: {_short(value)} is not valid; allowed: "
                + "; or ".join(_branch(s, root) for s in error.validator_value)]
    if kind == "additionalProperties":
        allowed = _allowed_keys(schema)
        patterns = list(schema.get("patternProperties", {}))
        if isinstance(value, dict) and (allowed or patterns):
            import re

            extra = sorted(k for k in value if k not in allowed and not any(re.search(p, k) for p in patterns))
            prefix = "" if where == "(top level)" else where + "."
            return [f"{prefix}{k}: unknown key{_closest(k, allowed)}" for k in extra]
        return [f"{where}: {error.message}"]
    if kind == "required":
        return [f"{where}: {error.message.replace(' is a required property', '')} is required but missing"]
    if kind == "enum":
        return [f"{where}: {_short(value)} is not one of {', '.join(map(str, error.validator_value))}"
                f"{_closest(value, error.validator_value)}"]
    if kind == "const":
        return [f"{where}: {_short(value)} must be {error.validator_value!r}"]
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return [f"{where}: {_short(value)} is not of type {want}"]
    if kind in _BOUNDS:
        return [f"{where}: {_short(value)} {_BOUNDS[kind].format(error.validator_value)}"]
    return [f"{where}: {_short(value)}: fails '{kind}: {_short(error.validator_value, 40)}'"]


def config_problems(config: dict, schema: dict) -> list[str]:
    """Every problem of config against schema (a JSON schema dict), one line each, in config order.

    The schema is not modified and no default is filled in. Returns [] for a valid config.
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    lines: list[str] = []
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        for line in _describe(error, schema):
            if line not in lines:
                lines.append(line)
    return lines


def check_config(config: dict, schema_path: str | Path, source: str = "config") -> None:
    """Raise :class:`ConfigError` (one line per problem) when config does not fit the schema file."""
    problems = config_problems(config, load_schema(schema_path))
    if problems:
        raise ConfigError(problems, source)
