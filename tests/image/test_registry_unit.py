"""Pure parts of `kbundle push` and `run --image`: the reference grammars, push names, the
engine's push/pull events, one-line errors, the label check and the pull's consent (no engine)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from kbundle.errors import KbundleError, UsageError
from kbundle.image import registry

D = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32
HASH = "f" * 64


@pytest.mark.parametrize(
    "text, registry_, namespace",
    [
        ("127.0.0.1:5000/lab", "127.0.0.1:5000", "lab"),
        ("127.0.0.1:5000/lab/", "127.0.0.1:5000", "lab"),
        ("ghcr.io/alice", "ghcr.io", "alice"),
        ("ghcr.io/alice/models", "ghcr.io", "alice/models"),
        ("localhost/team-a", "localhost", "team-a"),
        ("registry.example.org:443/a_b/c.d", "registry.example.org:443", "a_b/c.d"),
    ],
)
def test_destination_parses(text, registry_, namespace):
    assert registry.parse_destination(text) == registry.Destination(registry_, namespace)


@pytest.mark.parametrize(
    "text",
    [
        "lab",  # no registry
        "alice/models",  # Docker Hub's alice, not a named registry
        "127.0.0.1:5000",  # no namespace
        "127.0.0.1:5000/",
        "127.0.0.1:5000/Lab",  # upper case
        "127.0.0.1:5000/lab:v1",  # a tag
        "127.0.0.1:5000/lab@" + D,  # a digest
        "https://127.0.0.1:5000/lab",  # a URL
        "127.0.0.1:5000/lab//x",
        "127.0.0.1:5000/-lab",
        "127.0.0.1:5000/lab x",
        "",
    ],
)
def test_destination_refused_as_usage(text):
    with pytest.raises(UsageError, match="REGISTRY/NAMESPACE"):
        registry.parse_destination(text)


@pytest.mark.parametrize(
    "text, repository, registry_",
    [
        (f"127.0.0.1:5000/lab/demo@{D}", "127.0.0.1:5000/lab/demo", "127.0.0.1:5000"),
        (f"127.0.0.1:5000/lab/demo:0123abcd@{D}", "127.0.0.1:5000/lab/demo", "127.0.0.1:5000"),  # tag dropped
        (f"ghcr.io/alice/demo@{D}", "ghcr.io/alice/demo", "ghcr.io"),
        (f"alice/demo@{D}", "alice/demo", registry.DOCKER_HUB),
        (f"demo@{D}", "demo", registry.DOCKER_HUB),
        (f"localhost/demo@{D}", "localhost/demo", "localhost"),
    ],
)
def test_pinned_reference_parses(text, repository, registry_):
    ref = registry.parse_pinned(text)
    assert (ref.repository, ref.digest, ref.registry) == (repository, D, registry_)
    assert str(ref) == f"{repository}@{D}"


@pytest.mark.parametrize(
    "text, words",
    [
        ("127.0.0.1:5000/lab/demo", "tags move"),
        ("127.0.0.1:5000/lab/demo:latest", "tags move"),
        ("127.0.0.1:5000/lab/demo@sha256:abc", "tags move"),  # too short
        ("127.0.0.1:5000/lab/demo@sha512:" + "ab" * 64, "tags move"),
        ("127.0.0.1:5000/lab/demo@" + D.upper(), "tags move"),
        ("127.0.0.1:5000/lab/Demo@" + D, "not an image name"),
        ("127.0.0.1:5000/lab/demo:bad tag@" + D, "not an image name"),
        ("@" + D, "not an image name"),
        ("127.0.0.1:5000/@" + D, "not an image name"),
    ],
)
def test_pinned_reference_refused_as_usage(text, words):
    with pytest.raises(UsageError, match=words):
        registry.parse_pinned(text)


def test_push_target_is_the_namespace_plus_the_local_name_and_content_tag():
    dest = registry.parse_destination("127.0.0.1:5000/lab")
    assert registry.push_target("kbundle/demo:0123456789abcdef", dest) == (
        "127.0.0.1:5000/lab/demo",
        "0123456789abcdef",
    )
    with pytest.raises(UsageError, match="too long"):
        registry.push_target("kbundle/" + "a" * 250 + ":0123", dest)


def test_pulled_tag_is_this_bundles_name_and_the_digest():
    assert registry.pulled_tag("My Demo", D) == "kbundle/my-demo:" + "ab" * 8


@pytest.mark.parametrize(
    "repo_digests, repository, expected",
    [
        ([f"127.0.0.1:5000/lab/demo@{D}"], "127.0.0.1:5000/lab/demo", D),
        ([f"other/x@{D2}", f"127.0.0.1:5000/lab/demo@{D}"], "127.0.0.1:5000/lab/demo", D),
        ([f"other/x@{D2}"], "127.0.0.1:5000/lab/demo", None),
        ([], "127.0.0.1:5000/lab/demo", None),
        (None, "127.0.0.1:5000/lab/demo", None),
    ],
)
def test_digest_in_repo_digests(repo_digests, repository, expected):
    assert registry.digest_in(repo_digests, repository) == expected


@pytest.mark.parametrize(
    "labels, error",
    [
        ({"org.kbundle.content-hash": HASH}, None),
        ({"kbundle.bundle_hash": HASH}, None),  # kbundle 0.1's label
        ({"org.kbundle.content-hash": "e" * 64}, "was built from another bundle (content hash eeeeeeeeeeee…, this"),
        ({"maintainer": "x"}, "not a kbundle image"),
        ({}, "not a kbundle image"),
        (None, "not a kbundle image"),
    ],
)
def test_labels_must_name_this_bundle(labels, error):
    ref = f"127.0.0.1:5000/lab/demo@{D}"
    if error is None:
        registry.check_labels(labels, HASH, ref)
        return
    with pytest.raises(KbundleError) as caught:
        registry.check_labels(labels, HASH, ref)
    message = str(caught.value)
    assert error in message and ref in message and "\n" not in message
    if "another bundle" in message:
        assert message.endswith(f"this bundle's is {HASH[:12]}…)")


def test_a_hostile_label_is_shown_escaped():
    with pytest.raises(KbundleError) as caught:
        registry.check_labels({"org.kbundle.content-hash": "\x1b[2J\nfake"}, HASH, "x@" + D)
    assert "\x1b" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "action, message, words",
    [
        ("push", 'Get "http://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: connection refused', "cannot reach"),
        ("push", "unauthorized: authentication required", "docker login 127.0.0.1:5000"),
        ("push", "denied: requested access to the resource is denied", "docker login 127.0.0.1:5000"),
        ("pull", "no basic auth credentials", "docker login 127.0.0.1:5000"),
        ("push", "http: server gave HTTP response to HTTPS client", "insecure-registries"),
        ("pull", "manifest for x@sha256:00 not found: manifest unknown", "has no such image"),
        ("push", "blob upload invalid", "the push to 127.0.0.1:5000 failed: blob upload invalid"),
        ("pull", "something odd", "the pull from 127.0.0.1:5000 failed: something odd"),
        ("push", "", "no reason given"),
    ],
)
def test_registry_errors_are_one_line_naming_the_registry(action, message, words):
    line = registry.describe_error(action, "127.0.0.1:5000", message)
    assert words in line and "127.0.0.1:5000" in line and "\n" not in line


def test_not_found_means_a_missing_image_only_for_a_pull():
    assert "no such image" not in registry.describe_error("push", "r:1", "repository not found")


# The engine's own events (docker 20.10), shortened.
PUSH_EVENTS = [
    {"status": "The push refers to repository [127.0.0.1:5000/lab/demo]"},
    {"status": "Preparing", "progressDetail": {}, "id": "8f251c30a92c"},
    {"status": "Preparing", "progressDetail": {}, "id": "1a2b3c4d5e6f"},
    {"status": "Layer already exists", "progressDetail": {}, "id": "1a2b3c4d5e6f"},
    {"status": "Pushing", "progressDetail": {"current": 525244, "total": 1000000}, "id": "8f251c30a92c"},
    {"status": "Pushing", "progressDetail": {"current": 1096000, "total": 1000000}, "id": "8f251c30a92c"},
    {"status": "Pushed", "progressDetail": {}, "id": "8f251c30a92c"},
    {"status": f"0123: digest: {D} size: 528"},
    {"progressDetail": {}, "aux": {"Tag": "0123", "Digest": D, "Size": 528}},
]
PULL_EVENTS = [
    {"status": "Pulling from lab/demo", "id": f"127.0.0.1:5000/lab/demo@{D}"},
    {"status": "Already exists", "progressDetail": {}, "id": "1a2b3c4d5e6f"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "8f251c30a92c"},
    {"status": "Downloading", "progressDetail": {"current": 300, "total": 1000}, "id": "8f251c30a92c"},
    {"status": "Downloading", "progressDetail": {"current": 800, "total": 1000}, "id": "8f251c30a92c"},
    {"status": "Download complete", "progressDetail": {}, "id": "8f251c30a92c"},
    {"status": "Extracting", "progressDetail": {"current": 5000, "total": 9000}, "id": "8f251c30a92c"},
    {"status": "Pull complete", "progressDetail": {}, "id": "8f251c30a92c"},
    {"status": f"Digest: {D}"},
    {"status": f"Status: Downloaded newer image for 127.0.0.1:5000/lab/demo@{D}"},
]


@pytest.mark.parametrize(
    "transfer, events, layers, done, sent, total, digest",
    [
        (registry.Transfer.push(), PUSH_EVENTS, 2, 2, 1096000, 1000000, D),
        (registry.Transfer.push(), PUSH_EVENTS[:5], 2, 1, 525244, 1000000, None),
        (registry.Transfer.push(), PUSH_EVENTS[:-1], 2, 2, 1096000, 1000000, D),  # digest from the status line
        (registry.Transfer.push(), [e for e in PUSH_EVENTS if e.get("status") != "Pushing"], 2, 2, 0, 0, D),
        (registry.Transfer.pull(), PULL_EVENTS, 2, 2, 1000, 1000, D),  # extraction is not download
        (registry.Transfer.pull(), PULL_EVENTS[:4], 2, 1, 300, 1000, None),
    ],
)
def test_transfer_follows_layers_bytes_and_digest(transfer, events, layers, done, sent, total, digest):
    for event in events:
        transfer.feed(event)
    assert (len(transfer.layers), len(transfer.done), transfer.bytes, transfer.total_bytes, transfer.digest) == (
        layers,
        done,
        sent,
        total,
        digest,
    )
    assert transfer.error is None


@pytest.mark.parametrize(
    "event, error",
    [
        (
            {"errorDetail": {"message": "dial tcp: connection refused"}, "error": "short"},
            "dial tcp: connection refused",
        ),
        ({"error": "denied: access"}, "denied: access"),
    ],
)
def test_transfer_keeps_the_first_error(event, error):
    transfer = registry.Transfer.push()
    transfer.feed(PUSH_EVENTS[0])
    transfer.feed(event)
    transfer.feed({"error": "a later one"})
    assert transfer.error == error


# ----------------------------------------------------------------- run --image: review and consent


def test_pull_review_names_the_image_its_registry_and_that_nothing_is_built():
    from kbundle.flows.run import pull_review_lines

    lines = pull_review_lines("unsigned", registry.parse_pinned(f"127.0.0.1:5000/lab/demo@{D}"))
    text = "\n".join(lines)
    assert f"127.0.0.1:5000/lab/demo@{D}" in text and "contacts    127.0.0.1:5000" in text
    assert "nothing" in text and "built elsewhere" in text


def _console():
    from rich.console import Console

    out = io.StringIO()
    return Console(file=out, width=200, highlight=False), out


@pytest.mark.parametrize(
    "yes, interactive, answer, error",
    [
        (True, False, None, None),  # --yes: no question
        (False, False, None, "pass --yes"),  # no terminal: cannot ask
        (False, True, False, "you declined"),
        (False, True, True, None),
    ],
)
def test_consent_to_pull(yes, interactive, answer, error):
    from kbundle.flows.run import consent_to_pull

    console, out = _console()
    asked = []

    def ask(_console, question):
        asked.append(question)
        return answer

    call = lambda: consent_to_pull(console, yes, ["image  x"], ask=ask, interactive=interactive)  # noqa: E731
    if error:
        with pytest.raises(KbundleError, match=error):
            call()
    else:
        call()
    assert bool(asked) == (answer is not None)
    if asked:
        assert asked == ["Pull it and register the kernel? [y/N] "]
        assert "nothing is built" in out.getvalue() and "image  x" in out.getvalue()


@pytest.mark.parametrize(
    "built, pulled, ref, state",
    [
        (True, False, None, "(built, 2.0s)"),
        (False, False, None, "(already built: reused, 2.0s)"),
        (False, True, f"r:1/demo@{D}", f"(pulled r:1/demo@{D}, 2.0s)"),
        (False, False, f"r:1/demo@{D}", f"(already here by its digest: reused r:1/demo@{D}, 2.0s)"),
    ],
)
def test_summary_says_how_the_image_came(built, pulled, ref, state):
    from kbundle.flows.run import RunResult, summary_lines

    result = RunResult(
        "demo", "kbundle-demo", "demo (kbundle)", "kbundle/demo:1", "sha256:1", Path("/w"), Path("/w/nb.ipynb"),
        built, [], 2.0, 1, 0, "debian:bookworm", pulled=pulled, image_ref=ref,
    )  # fmt: skip
    assert summary_lines(result)[0] == f"image      kbundle/demo:1 {state}"
    assert result.to_dict()["pulled"] is pulled and result.to_dict()["image_ref"] == ref
