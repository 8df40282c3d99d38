#!/usr/bin/env python3
"""Generate golden JSON wire-format fixtures from the real Python Dramatiq.

Troupe (the Rust port) must put exactly the same bytes on the wire as
Dramatiq does, so that Python and Rust workers can share a broker.  This
script builds a handful of ``dramatiq.Message`` objects with *fixed*
message ids and timestamps, encodes them the way Dramatiq's brokers do,
and writes the raw bytes to::

    crates/troupe-core/tests/fixtures/json/<case>.json

It also (re)writes ``README.md`` in that directory, describing how the
files were produced and what each one contains.

What is "the wire format"?
--------------------------
Both ``RedisBroker.enqueue`` and ``RabbitmqBroker.enqueue`` send
``message.encode()``, and ``Message.encode()`` is literally
``global_encoder.encode(self.asdict())``, where the default global encoder
is ``JSONEncoder``, i.e. ``json.dumps(data, separators=(",", ":"))``
encoded as UTF-8.  The Redis Lua script (``dispatch.lua``, command
"enqueue") stores those bytes unchanged with ``HSET``.  So
``JSONEncoder().encode(message.asdict())`` *is* the wire format.  This
script asserts that it is byte-identical to ``message.encode()`` for every
case, so a future Dramatiq release that changes this would be noticed.

Note that the Redis broker itself adds ``options["redis_message_id"]``
(a fresh uuid4) at enqueue time, and both brokers add ``options["eta"]``
and switch ``queue_name`` to ``<queue>.DQ`` for delayed messages.  The
fixtures here are the messages *as given*; the ``options`` and ``delayed``
cases show what such broker-mutated messages look like.

Usage (from the repository root)::

    /work/venv-dramatiq/bin/python scripts/gen_golden_fixtures.py [OUT_DIR]

OUT_DIR defaults to crates/troupe-core/tests/fixtures/json relative to the
repository root (the parent of this script's directory).  The script is
deterministic: running it again with the same Dramatiq/Python versions
produces identical files.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path

import dramatiq
from dramatiq import JSONEncoder, Message
from dramatiq.brokers.stub import StubBroker

# ---------------------------------------------------------------------------
# Fixed identifiers.  These look like uuid4 strings (version nibble "4",
# variant nibble in 8..b) but are hard-coded so the output is reproducible.
# ---------------------------------------------------------------------------
IDS = {
    "simple": "0b6f3c1e-2d4a-4f8b-9c1d-3e5f7a9b1c2d",
    "empty_args": "1c7a4d2f-3e5b-4a9c-8d2e-4f6a8b0c2d3e",
    "kwargs": "2d8b5e3a-4f6c-4b0d-9e3f-5a7b9c1d3e4f",
    "unicode": "3e9c6f4b-5a7d-4c1e-af4a-6b8c0d2e4f5a",
    "nested": "4fad7a5c-6b8e-4d2f-b05b-7c9d1e3f5a6b",
    "large_ints": "5abe8b6d-7c9f-4e3a-816c-8dae2f4a6b7c",
    "floats": "6bcf9c7e-8dae-4f4b-927d-9ebf3a5b7c8d",
    "nan_inf": "7cd0ad8f-9ebf-405c-a38e-afc04b6c8d9e",
    "options": "8de1be9a-afc0-416d-b49f-b0d15c7d9eaf",
    "delayed": "9ef2cfab-b0d1-427e-85a0-c1e26d8eafb0",
    "pipeline": "af03d0bc-c1e2-438f-96b1-d2f37e9fb0c1",
    # The second message of the pipeline (becomes options["pipe_target"]).
    "pipeline_next": "b014e1cd-d2f3-4490-a7c2-e3048fa0c1d2",
}
# Used as the value of options["redis_message_id"] in the `options` case.
REDIS_MESSAGE_ID = "c125f2de-e304-45a1-88d3-f41590b1d2e3"

# Fixed timestamps (milliseconds since the epoch), one per case.
BASE_TS = 1700000000000


def msg(case, *, queue_name="default", actor_name="add", args=(), kwargs=None,
        options=None, ts_offset=0, message_id=None):
    """Build a Message with a fixed id and timestamp for ``case``."""
    return Message(
        queue_name=queue_name,
        actor_name=actor_name,
        args=tuple(args),
        kwargs={} if kwargs is None else kwargs,
        options={} if options is None else options,
        message_id=message_id or IDS[case],
        message_timestamp=BASE_TS + ts_offset,
    )


def build_pipeline_message():
    """Build the first message of a 2-step pipeline via ``dramatiq.pipeline``.

    ``pipeline.__init__`` copies each child (``Message.copy`` keeps the
    message id and timestamp) and then sets, on every message but the last,
    ``options["pipe_target"] = next_message.asdict()``.  A StubBroker is
    passed explicitly so that no global broker (RabbitMQ by default) is
    created.  Only the first message is written: it is the one enqueued,
    and it carries the second one inside its options.
    """
    first = msg("pipeline", actor_name="add", args=[1, 2], ts_offset=10)
    second = msg("pipeline_next", actor_name="multiply", args=[10],
                 ts_offset=11, message_id=IDS["pipeline_next"])
    pipe = dramatiq.pipeline([first, second], broker=StubBroker())
    head = pipe.messages[0]
    assert head.options["pipe_target"] == second.asdict()
    assert "pipe_target" not in pipe.messages[1].options
    return head


# ---------------------------------------------------------------------------
# The cases, in the order they are documented.  Each entry is
# (name, message, human description for the README).
# ---------------------------------------------------------------------------
def build_cases():
    cases = []

    def add(name, message, description):
        cases.append((name, message, description))

    add("simple", msg("simple", args=[1, 2], ts_offset=0),
        'queue "default", actor "add", args [1, 2], kwargs {}, options {}.')

    add("empty_args", msg("empty_args", ts_offset=1),
        'queue "default", actor "add", args [], kwargs {}, options {}.')

    add("kwargs", msg("kwargs", kwargs={"x": 1, "y": "two", "z": None}, ts_offset=2),
        'args [], kwargs {"x": 1, "y": "two", "z": None} (insertion order kept), options {}.')

    add("unicode", msg(
        "unicode",
        args=[
            "héllo",
            "日本語",
            "emoji 😀 and 𝄞",
            "quote \" backslash \\ newline \n tab \t nul \u0000 del \u007f",
        ],
        kwargs={"ключ": "значение"},
        ts_offset=3,
    ), "non-ASCII (BMP and astral), JSON escapes, NUL and DEL in args; "
       "Cyrillic key and value in kwargs.")

    add("nested", msg(
        "nested",
        args=[{"a": [1, {"b": [True, False, None]}], "c": {}}, [[[]]]],
        kwargs={"deep": {"list": [1, 2.5, "s"]}},
        ts_offset=4,
    ), "nested objects/arrays, booleans, null, empty object and nested empty arrays.")

    add("large_ints", msg(
        "large_ints",
        args=[2**63 - 1, -(2**63), 2**64 - 1, 0, -1, 9007199254740993],
        ts_offset=5,
    ), "i64::MAX, i64::MIN, u64::MAX, 0, -1 and 2**53+1 (not exactly representable as f64).")

    add("floats", msg(
        "floats",
        args=[0.0, -0.0, 1.5, 0.1, 1e16, 1.5e16, 1e-05, 0.0001, 123456789.123,
              1e300, 5e-324, 100.0, 1e15, -2.5e-7],
        ts_offset=6,
    ), "Python float repr spellings (exponent thresholds, -0.0, subnormal, integral floats).")

    add("nan_inf", msg(
        "nan_inf",
        args=[float("nan"), float("inf"), float("-inf")],
        ts_offset=7,
    ), "NaN, Infinity, -Infinity (non-standard JSON tokens; json.dumps allow_nan=True).")

    add("options", msg(
        "options",
        args=[1, 2],
        options={
            "redis_message_id": REDIS_MESSAGE_ID,
            "eta": 1700000005000,
            "retries": 3,
            "max_retries": 5,
            "min_backoff": 1000,
            "max_backoff": 60000,
            "traceback": "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad",
            "on_success": "done",
            "on_failure": "failed",
            "pipe_ignore": True,
            "store_results": True,
            "result_ttl": 600000,
            "broker_priority": 3,
            "custom_unknown_key": {"keep": ["me", 1]},
        },
        ts_offset=8,
    ), "args [1, 2] and every well-known option plus an unknown one, in insertion order.")

    add("delayed", msg(
        "delayed",
        queue_name="default.DQ",
        args=[1, 2],
        options={"eta": 1700000009000},
        ts_offset=9,
    ), 'delay-queue message: queue "default.DQ", args [1, 2], options {"eta": 1700000009000}.')

    add("pipeline", build_pipeline_message(),
        'first message of dramatiq.pipeline([add(1, 2), multiply(10)]): '
        'options {"pipe_target": <asdict() of the multiply message>}.')

    return cases


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def deep_equal(a, b):
    """Structural equality where NaN == NaN, -0.0 != 0.0 and bool != int."""
    if type(a) is not type(b):
        # JSON arrays decode to lists while Message.args is a tuple.
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            pass
        else:
            return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b


def readme_text(cases):
    """Render README.md for the fixture directory."""
    py = platform.python_implementation() + " " + platform.python_version()
    lines = [
        "# Golden JSON wire-format fixtures (generated, do not edit)",
        "",
        f"These files were produced by `scripts/gen_golden_fixtures.py` using the real "
        f"Python Dramatiq {dramatiq.__version__} on {py}. Each file holds the exact bytes "
        f"(no trailing newline) of `dramatiq.JSONEncoder().encode(message.asdict())`, which is "
        f"byte-identical to `Message.encode()` and to what `RedisBroker`/`RabbitmqBroker` put "
        f"on the wire (`json.dumps(data, separators=(\",\", \":\"))` as UTF-8: compact separators, "
        f"`ensure_ascii=True`, `allow_nan=True`, dict insertion order kept). Every message has a "
        f"fixed `message_id` and `message_timestamp` (listed below); unless stated otherwise "
        f"`queue_name` is `\"default\"` and `actor_name` is `\"add\"`. Regenerate with "
        f"`python3 -m venv /work/venv-dramatiq && /work/venv-dramatiq/bin/pip install "
        f"'dramatiq[redis,rabbitmq]=={dramatiq.__version__}'` then, from the repository root, "
        f"`/work/venv-dramatiq/bin/python scripts/gen_golden_fixtures.py`.",
        "",
        "## Cases",
        "",
        "The Python literal after each description is `message.asdict()` exactly "
        "(`args` is a tuple in Python and a JSON array on the wire).",
        "",
    ]
    for name, message, description in cases:
        lines.append(f"- `{name}.json`: {description}")
        lines.append("")
        lines.append("  ```python")
        lines.append("  " + repr(message.asdict()))
        lines.append("  ```")
        lines.append("")
    return "\n".join(lines)


def main(argv):
    repo_root = Path(__file__).resolve().parent.parent
    out_dir = Path(argv[1]) if len(argv) > 1 else (
        repo_root / "crates" / "troupe-core" / "tests" / "fixtures" / "json")
    out_dir.mkdir(parents=True, exist_ok=True)

    encoder = JSONEncoder()
    cases = build_cases()
    for name, message, _ in cases:
        data = encoder.encode(message.asdict())

        # Sanity 1: this is exactly what the brokers send (Message.encode()
        # uses the global encoder, which defaults to a JSONEncoder).
        assert isinstance(dramatiq.get_encoder(), JSONEncoder)
        assert data == message.encode(), name

        # Sanity 2: Python reads it back to the same message.
        decoded = encoder.decode(data)
        again = Message(**decoded)
        assert deep_equal(again.asdict(), message.asdict()), name

        path = out_dir / f"{name}.json"
        with open(path, "wb") as f:
            f.write(data)
        print(f"wrote {path} ({len(data)} bytes)")

    readme = out_dir / "README.md"
    with open(readme, "w", encoding="utf-8", newline="\n") as f:
        f.write(readme_text(cases))
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
