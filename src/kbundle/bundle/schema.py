"""The manifest's schema: what a well-formed `kbundle.json` is, checked before any field is used.

A manifest comes from a stranger. Every field is checked for its type (a bool is not an int),
its length, and for names and paths its characters, so that nothing downstream meets a value
it does not expect, and nothing shown on a terminal or written into a file can carry a newline.
Unknown fields are allowed (fields are added within format version 1) but, like every value,
bounded in depth. Failures raise `SchemaError` with a JSON path and the rule, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kbundle.bundle.format import FORMAT_VERSION, MANIFEST, SIGNATURE, WORK_DIR
from kbundle.bundle.limits import MAX_MEMBERS, MEMBER_NAME_LIMIT

Check = Callable[[object, str], None]

MAX_DEPTH = 8  # the manifest itself nests 3 deep; room for fields added later
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # as `kbundle pack --name` enforces
IMAGE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")  # as the Dockerfile renderer enforces
SHA256 = re.compile(r"[0-9a-f]{64}")
# Specs, channels, versions: printable, no control or line-separator characters, no spaces at the ends.
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*")


class SchemaError(ValueError):
    """One rule the manifest breaks; the message names the field, never echoes its value."""


def _fail(where: str, rule: str) -> None:
    raise SchemaError(f"{where} {rule}")


def text(limit: int, *, pattern: re.Pattern | None = None, null: bool = False, plain: bool = True) -> Check:
    """A string of at most `limit` characters; `plain`: no control characters (it ends up in a file
    or a command); otherwise free text that is only ever shown through display.safe."""

    def check(value: object, where: str) -> None:
        if value is None and null:
            return
        if not isinstance(value, str):
            _fail(where, "must be a string" + (" or null" if null else ""))
        if len(value) > limit:
            _fail(where, f"is longer than {limit} characters")
        if pattern is not None and not pattern.fullmatch(value):
            _fail(where, "has characters or a form that is not allowed")
        if plain and not _PRINTABLE.fullmatch(value):
            _fail(where, "has control characters")

    return check


def boolean(value: object, where: str) -> None:
    if not isinstance(value, bool):
        _fail(where, "must be true or false")


def integer(low: int, high: int) -> Check:
    def check(value: object, where: str) -> None:
        # bool is an int subclass in Python; `true` is not a number in a manifest.
        if type(value) is not int or not low <= value <= high:
            _fail(where, f"must be an integer from {low} to {high}")

    return check


def member_path(value: object, where: str) -> None:
    """A safe relative member path (the reader's name rule), not a reserved member."""
    text(MEMBER_NAME_LIMIT)(value, where)
    parts = value.split("/")
    if "\\" in value or value.startswith("/") or (len(value) > 1 and value[1] == ":") or value in (MANIFEST, SIGNATURE):
        _fail(where, "is not a member path")
    if any(part in ("", ".", "..") for part in parts):
        _fail(where, "is not a member path")


def under_work(suffix: str = "") -> Check:
    def check(value: object, where: str) -> None:
        member_path(value, where)
        if not value.startswith(WORK_DIR) or not value.endswith(suffix) or len(value) <= len(WORK_DIR) + len(suffix):
            _fail(where, f"must be a member under {WORK_DIR}" + (f" ending in {suffix}" if suffix else ""))

    return check


def optional(check: Check) -> Check:
    def wrapped(value: object, where: str) -> None:
        if value is not None:
            check(value, where)

    return wrapped


def list_of(item: Check, limit: int) -> Check:
    def check(value: object, where: str) -> None:
        if not isinstance(value, list):
            _fail(where, "must be a list")
        if len(value) > limit:
            _fail(where, f"has more than {limit} entries")
        for i, entry in enumerate(value):
            item(entry, f"{where}[{i}]")

    return check


def record(fields: dict[str, Check], required: frozenset[str] = frozenset(), *, open_: bool = True) -> Check:
    """An object with these fields; `open_`: other fields are allowed (and ignored by the reader)."""

    def check(value: object, where: str) -> None:
        if not isinstance(value, dict):
            _fail(where, "must be an object")
        for key in sorted(required - value.keys()):
            _fail(f"{where}.{key}", "is missing")
        if not open_ and value.keys() - fields.keys():
            _fail(where, "has fields that are not allowed")
        for key, field_check in fields.items():
            if key in value:
                field_check(value[key], f"{where}.{key}")

    return check


def scalar(limit: int) -> Check:
    def check(value: object, where: str) -> None:
        if isinstance(value, str):
            text(limit)(value, where)
        elif value is not None and not isinstance(value, (bool, int)):
            _fail(where, "must be a string, a boolean, an integer or null")

    return check


_SPEC = text(500)
_REASON = text(2000, plain=False)  # shown to people only, through display.safe
_NOTE = dict(spec=_SPEC, reason=_REASON)

MANIFEST_SCHEMA = record(
    {
        "format_version": integer(FORMAT_VERSION, FORMAT_VERSION),
        "name": text(63, pattern=NAME),
        "notebook": under_work(".ipynb"),
        "python": text(64, null=True),
        "cuda": text(16, null=True),
        "cudnn": text(16, null=True),
        "cuda_runtime_in_env": boolean,
        "cuda_env_libs": boolean,
        "require_cuda": text(64, null=True),
        "base_image": text(255, pattern=IMAGE_REF),
        "base_image_reason": _REASON,
        "conda": record(
            {"channels": list_of(text(1024), 100), "dependencies": list_of(_SPEC, 5000)},
            frozenset({"channels", "dependencies"}),
        ),
        "channel_urls": list_of(text(1024), 200),
        "pip": list_of(text(2000), 5000),  # `name==1.0 --hash=sha256:…` when pip_locked
        "pip_indexes": record(
            {
                "index_url": text(1024, null=True),
                "extra_index_urls": list_of(text(1024), 50),
                "find_links": list_of(text(1024), 50),
            }
        ),
        "pip_locked": boolean,
        "changed": list_of(
            record(dict(spec=_SPEC, to=_SPEC, reason=_REASON), frozenset({"spec", "to", "reason"})), 5000
        ),
        "dropped": list_of(record(_NOTE, frozenset(_NOTE)), 5000),
        "added": list_of(record(_NOTE, frozenset(_NOTE)), 5000),
        "variants": list_of(
            record(dict(package=_SPEC, spec=_SPEC, intent=_REASON), frozenset({"package", "spec", "intent"})), 5000
        ),
        "locked": boolean,
        "lock": optional(member_path),
        "virtual_packages": list_of(text(200), 100),
        "lock_virtual_packages": list_of(text(200), 100),
        "lock_note": text(2000, null=True, plain=False),
        "environment": member_path,
        "original_environment": optional(member_path),
        "source": record({key: scalar(1000) for key in ("kind", "env_name", "platform")}),
        "dockerfile": member_path,
        "includes": list_of(under_work(), MAX_MEMBERS),
        "content_hash": text(64, pattern=re.compile(r"([0-9a-f]{64})?")),
        "bundle_hash": text(64, pattern=re.compile(r"([0-9a-f]{64})?")),
        "files": list_of(
            record(
                {"path": member_path, "sha256": text(64, pattern=SHA256), "size": integer(0, 1 << 40)},
                frozenset({"path", "sha256", "size"}),
            ),
            MAX_MEMBERS,
        ),
        "platform": text(32, pattern=re.compile(r"linux-64")),
        "kbundle_version": text(64),
    },
    frozenset(
        {
            "format_version",
            "name",
            "notebook",
            "python",
            "cuda",
            "cudnn",
            "cuda_runtime_in_env",
            "base_image",
            "base_image_reason",
            "pip",
            "files",
        }
    ),
)


def depth(value: object) -> int:
    """How deeply a parsed JSON value nests (iteratively, so depth itself cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_manifest(data: object) -> None:
    """Raise SchemaError for the first rule the parsed manifest breaks."""
    if depth(data) > MAX_DEPTH:
        _fail("the manifest", f"nests deeper than {MAX_DEPTH} levels")
    MANIFEST_SCHEMA(data, "manifest")
    _check_consistency(data)


def _check_consistency(data: dict) -> None:
    """Rules between fields: the members the manifest names must be members it lists."""
    listed = {entry["path"] for entry in data["files"]}
    if len(listed) != len(data["files"]):
        _fail("manifest.files", "lists a member twice")
    named = [("notebook", data["notebook"]), ("dockerfile", data.get("dockerfile", "Dockerfile"))]
    named += [("environment", data.get("environment", "env/environment.yml"))]
    named += [(key, data[key]) for key in ("lock", "original_environment") if data.get(key) is not None]
    named += [(f"includes[{i}]", path) for i, path in enumerate(data.get("includes") or [])]
    for key, path in named:
        if path not in listed:
            _fail(f"manifest.{key}", "names a member that the manifest does not list")
    if data.get("locked") and not data.get("lock"):
        _fail("manifest.lock", "is missing for a locked bundle")
