"""Check a result against ``schema.json``, and its rows against each other.

Two engines: ``jsonschema`` when it is installed, else a small hand validator
that implements exactly the keywords the schema uses and refuses any other
(``SchemaError``), so a constraint added to the schema is never silently
ignored. Then checks no schema can say: an ok row's median is the median of
its timings, a ratio names an ok peer row of the same group and equals the
medians' quotient, the summary counts the rows.

    python -m benchmarks.validate RESULT.json [...]
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.json")
HAND_KEYWORDS = frozenset({
    "$schema", "$id", "title", "description", "$defs", "$ref",
    "type", "enum", "minimum", "properties", "required", "additionalProperties", "items",
})
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
}


class ValidationError(ValueError):
    """A result does not match the schema or is inconsistent."""


class SchemaError(ValueError):
    """The schema uses something the hand validator does not implement."""


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the hand validator
def hand_errors(doc, schema: dict) -> list:
    errors = []
    _check(doc, schema, schema, "$", errors)
    return errors


def _resolve(ref: str, root: dict) -> dict:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref is implemented, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _check(value, schema: dict, root: dict, path: str, errors: list) -> None:
    unknown = set(schema) - HAND_KEYWORDS
    if unknown:
        raise SchemaError(f"{path}: the hand validator does not implement {sorted(unknown)}")
    if "$ref" in schema:
        _check(value, _resolve(schema["$ref"], root), root, path, errors)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.80}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        _check_object(value, schema, root, path, errors)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{i}]", errors)


def _check_object(value: dict, schema: dict, root: dict, path: str, errors: list) -> None:
    for key in schema.get("required", ()):
        if key not in value:
            errors.append(f"{path}: missing required key {key!r}")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            _check(item, properties[key], root, f"{path}.{key}", errors)
        elif extra is False:
            errors.append(f"{path}: unexpected key {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, root, f"{path}.{key}", errors)


# --------------------------------------------------------------------------- jsonschema, when installed
def jsonschema_errors(doc, schema: dict):
    """The errors jsonschema finds, or None when it is not installed."""
    try:
        import jsonschema
    except ImportError:
        return None
    validator = jsonschema.Draft202012Validator(schema)
    return [f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- what a schema cannot say
def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


_NUMBERS = ("median_ms", "images_per_s", "first_call_s", "achieved_tflops", "roofline_share", "wall_s",
            "output_abs_mean")


def _row_errors(row: dict) -> list:
    where = f"case {row.get('id')!r}"
    expected_id = (f"{row['kind']}:{row['target']}:{row['mode']}:{row['dtype']}:{row['memory_format']}:"
                   f"b{row['batch']}:{row['impl']}")
    errors = [] if row["id"] == expected_id else [f"{where}: id does not match its fields ({expected_id!r})"]
    status = row["status"]
    not_finite = [k for k in _NUMBERS if isinstance(row.get(k), float) and not math.isfinite(row[k])]
    not_finite += ["timings_ms"] if any(not math.isfinite(t) for t in row["timings_ms"]) else []
    not_finite += ["ratio_to_peers"] if any(not math.isfinite(v) for v in row["ratio_to_peers"].values()) else []
    if not_finite:  # NaN passes every "minimum" of the schema
        return errors + [f"{where}: {', '.join(not_finite)} not finite"]
    if status == "ok":
        if (not row["timings_ms"] or row["median_ms"] is None or row["first_call_s"] is None
                or row["images_per_s"] is None):
            errors.append(f"{where}: ok without timings, median, images/s or first-call time")
        elif row["median_ms"] <= 0:
            errors.append(f"{where}: ok with a median of {row['median_ms']} ms")
        elif row["iterations"] != len(row["timings_ms"]):
            errors.append(f"{where}: iterations ({row['iterations']}) is not the number of timings")
        elif not _close(row["median_ms"], statistics.median(row["timings_ms"])):
            errors.append(f"{where}: median_ms is not the median of timings_ms")
        elif not _close(row["images_per_s"], row["batch"] / (row["median_ms"] * 1e-3)):
            errors.append(f"{where}: images_per_s is not batch / median")
    else:
        if row["timings_ms"] or row["median_ms"] is not None or row["ratio_to_peers"]:
            errors.append(f"{where}: {status} but has timings or ratios")
    if status == "error" and row["error"] is None:
        errors.append(f"{where}: error without an error record")
    if status == "skipped" and not row["reason"]:
        errors.append(f"{where}: skipped without a reason")
    if status != "error" and row["error"] is not None:
        errors.append(f"{where}: {status} but has an error record")
    return errors


def _ratio_errors(row: dict, peers_by_key: dict) -> list:
    errors = []
    if row["status"] == "ok" and row["impl"].startswith("ours:"):
        missing = [key for group, key in peers_by_key if group == row["group"] and key not in row["ratio_to_peers"]]
        if missing:
            errors.append(f"case {row['id']!r}: no ratio to the ok peer rows {missing} of its group")
    for key, ratio in row["ratio_to_peers"].items():
        peer = peers_by_key.get((row["group"], key))
        if peer is None:
            errors.append(f"case {row['id']!r}: ratio to {key!r}, which is no ok peer row of its group")
        elif row["median_ms"] and not _close(ratio, peer["median_ms"] / row["median_ms"]):  # a 0 is _row_errors
            errors.append(f"case {row['id']!r}: ratio to {key!r} is not the medians' quotient")
    return errors


def consistency_errors(doc: dict) -> list:
    rows = doc["cases"]
    errors = []
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        errors.append("case ids are not unique")
    peers_by_key = {(r["group"], f"{r['impl']}@{r['memory_format']}"): r for r in rows
                    if r["status"] == "ok" and not r["impl"].startswith("ours:")}
    for row in rows:
        errors += _row_errors(row) + _ratio_errors(row, peers_by_key)
    summary = doc["summary"]
    for status in ("ok", "error", "skipped"):
        if summary[status] != sum(r["status"] == status for r in rows):
            errors.append(f"summary.{status} does not count the rows")
    if summary["cases"] != len(rows):
        errors.append("summary.cases does not count the rows")
    return errors


# --------------------------------------------------------------------------- entry points
def errors(doc, engine: str = "auto") -> list:
    """Every problem found; ``engine``: "auto" (jsonschema if installed), "jsonschema" or "hand"."""
    schema = load_schema()
    found = None
    if engine in ("auto", "jsonschema"):
        found = jsonschema_errors(doc, schema)
        if found is None and engine == "jsonschema":
            raise ImportError("jsonschema is not installed")
    if found is None:
        found = hand_errors(doc, schema)
    if not found:  # consistency checks assume the shapes the schema guarantees
        found = consistency_errors(doc)
    return found


def validate(doc, engine: str = "auto") -> None:
    found = errors(doc, engine)
    if found:
        more = f"\n... and {len(found) - 20} more" if len(found) > 20 else ""
        raise ValidationError("benchmark result is invalid:\n" + "\n".join(found[:20]) + more)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    status = 0
    for path in paths:
        with open(path) as f:
            found = errors(json.load(f))
        print(f"{path}: {'valid' if not found else 'INVALID'}")
        for line in found[:20]:
            print(f"  {line}")
        status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(main())
