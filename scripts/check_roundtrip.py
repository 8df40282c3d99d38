#!/usr/bin/env python3
"""Check that the real Python Dramatiq can read messages written by Troupe.

Two modes (run with the Dramatiq venv's python, e.g.
``/work/venv-dramatiq/bin/python scripts/check_roundtrip.py ...``):

``check_roundtrip.py DIR``
    For every ``*.json`` file in DIR (sorted by name), decode the raw bytes
    exactly as a Dramatiq worker does -- ``dramatiq.JSONEncoder().decode(data)``
    followed by ``dramatiq.Message(**decoded)`` -- and print ``ok <file>`` or
    ``FAIL <file>: <error>``.

    Dramatiq itself enforces valid UTF-8, valid JSON, no unknown fields and
    the presence of queue_name/actor_name/args/kwargs/options (message_id and
    message_timestamp have defaults).  On top of that, all seven fields must
    be present, and each must have the JSON type Dramatiq's code relies on: queue_name/actor_name/message_id are strings,
    args is an array, kwargs/options are objects and message_timestamp is an
    integer (not a float or bool).  Dramatiq does not validate these at decode
    time, but a Python worker would misbehave later, so a mismatch is a Troupe
    bug.  Pass ``--lenient`` to skip these type checks.

``check_roundtrip.py --compare DIR_A DIR_B``
    For every ``*.json`` file name present in both directories, decode both
    files as above and check that Python gets EQUAL values.  This shows that
    two encodings that differ only in spelling (e.g. ``1e+16`` vs ``1e16``,
    ``"\\u00e9"`` vs a raw UTF-8 ``é``, different key order) read back the
    same.  Equality is structural, with these rules:

      * NaN equals NaN (Python's ``==`` would say they differ);
      * by default types must match: ``1`` (int) != ``1.0`` (float),
        ``true`` != ``1``, and ``0.0`` != ``-0.0`` -- a Rust encoder that
        writes ``100.0`` as ``100`` makes Python read an int, which is a real
        difference for user code.  ``--lenient`` falls back to Python's
        ``==`` semantics (plus NaN == NaN);
      * object key order is ignored (Python dicts compare unordered).

    Files present in only one directory are listed as ``only-in <dir>: <file>``
    and are not failures.

Exit status: 0 if every file is ok, 1 if any FAIL, 2 for usage errors or when
there is nothing to check (empty directory / no common file names).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import dramatiq
from dramatiq import JSONEncoder, Message

ENCODER = JSONEncoder()

# JSON types Dramatiq's runtime code relies on, per Message field.
FIELD_TYPES = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
    "message_id": str,
    "message_timestamp": int,
}


def decode_file(path: Path, *, lenient: bool):
    """Decode ``path`` like a Dramatiq worker; return the decoded dict.

    Raises an exception describing the problem if Dramatiq cannot read the
    file (or, unless ``lenient``, if a field has the wrong JSON type).
    """
    data = path.read_bytes()
    decoded = ENCODER.decode(data)  # raises dramatiq.DecodeError
    if not isinstance(decoded, dict):
        raise TypeError(f"top-level JSON value is {type(decoded).__name__}, not an object")
    # Message(**decoded) raises TypeError on missing or unexpected fields.
    # Pass a shallow copy: Message.__post_init__ turns args into a tuple on
    # the Message, and we want to keep the raw decoded value for comparison.
    Message(**dict(decoded))
    if not lenient:
        for field, expected in FIELD_TYPES.items():
            if field not in decoded:
                # message_id and message_timestamp have defaults in
                # Message, so Dramatiq would silently invent them.
                raise KeyError(f"missing field {field!r} (Dramatiq would fill in a default)")
            value = decoded[field]
            # bool is a subclass of int in Python; reject it explicitly.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise TypeError(
                    f"field {field!r} is {type(value).__name__} ({value!r}), "
                    f"expected {expected.__name__}")
    return decoded


def first_difference(a, b, *, lenient: bool, where: str = "$"):
    """Return a description of the first difference between a and b, or None."""
    # NaN == NaN for our purposes.
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if not lenient:
        if type(a) is not type(b):
            return f"{where}: {type(a).__name__} {a!r} != {type(b).__name__} {b!r}"
        if isinstance(a, float) and a == 0.0 and b == 0.0 and \
                math.copysign(1.0, a) != math.copysign(1.0, b):
            return f"{where}: {a!r} != {b!r} (sign of zero)"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return (f"{where}: keys differ: only in A {sorted(set(a) - set(b))!r}, "
                    f"only in B {sorted(set(b) - set(a))!r}")
        for key in a:
            diff = first_difference(a[key], b[key], lenient=lenient, where=f"{where}[{key!r}]")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: array lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, lenient=lenient, where=f"{where}[{i}]")
            if diff:
                return diff
        return None
    if isinstance(a, float) and isinstance(b, float) and (math.isnan(a) or math.isnan(b)):
        return f"{where}: {a!r} != {b!r}"
    if a != b or isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return f"{where}: {a!r} != {b!r}"
    return None


def json_files(directory: Path):
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix == ".json")


def check_dir(directory: Path, *, lenient: bool) -> int:
    files = json_files(directory)
    if not files:
        print(f"FAIL {directory}: no .json files found")
        return 2
    failures = 0
    for path in files:
        try:
            decode_file(path, lenient=lenient)
        except Exception as e:  # report every kind of failure, keep going
            failures += 1
            print(f"FAIL {path.name}: {type(e).__name__}: {e}")
        else:
            print(f"ok {path.name}")
    return 1 if failures else 0


def compare_dirs(dir_a: Path, dir_b: Path, *, lenient: bool) -> int:
    names_a = {p.name for p in json_files(dir_a)}
    names_b = {p.name for p in json_files(dir_b)}
    for name in sorted(names_a - names_b):
        print(f"only-in {dir_a}: {name}")
    for name in sorted(names_b - names_a):
        print(f"only-in {dir_b}: {name}")
    common = sorted(names_a & names_b)
    if not common:
        print(f"FAIL: no common .json file names in {dir_a} and {dir_b}")
        return 2
    failures = 0
    for name in common:
        try:
            a = decode_file(dir_a / name, lenient=lenient)
            b = decode_file(dir_b / name, lenient=lenient)
            diff = first_difference(a, b, lenient=lenient)
            if diff:
                raise ValueError(f"decoded values differ at {diff}")
        except Exception as e:
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        else:
            print(f"ok {name}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Check Troupe JSON messages with Python Dramatiq {dramatiq.__version__}.")
    parser.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                        help="check that same-named files in both dirs decode to equal values")
    parser.add_argument("--lenient", action="store_true",
                        help="skip field type checks; compare with Python == (NaN still equals NaN)")
    parser.add_argument("dir", nargs="?", help="directory of .json files to decode")
    args = parser.parse_args(argv)

    if args.compare and args.dir:
        parser.error("give either DIR or --compare DIR_A DIR_B, not both")
    if args.compare:
        dir_a, dir_b = (Path(d) for d in args.compare)
        for d in (dir_a, dir_b):
            if not d.is_dir():
                parser.error(f"not a directory: {d}")
        return compare_dirs(dir_a, dir_b, lenient=args.lenient)
    if not args.dir:
        parser.error("a directory is required")
    directory = Path(args.dir)
    if not directory.is_dir():
        parser.error(f"not a directory: {directory}")
    return check_dir(directory, lenient=args.lenient)


if __name__ == "__main__":
    sys.exit(main())
