"""The pip: section as pip means it: every requirement form is read, what cannot exist on Linux
is dropped with a reason, index options are carried as `pip_indexes` (table-driven, no network)."""

from __future__ import annotations

import json

import pytest

from kbundle.errors import UsageError
from kbundle.pack.envfile import read_env_file
from kbundle.pack.normalise import LOCAL_REASON, normalise, pip_indexes
from kbundle.pack.piplock import lockable, pins_from_report
from kbundle.specs import PipIndexes, parse_pip_line, parse_pip_option


@pytest.mark.parametrize(
    "line, name, version, url, exact, vcs, local",
    [
        ("test-tube>=0.7.5", "test-tube", None, None, False, False, False),
        ("tensorflow~=2.6.0", "tensorflow", None, None, False, False, False),
        ("pyspng", "pyspng", None, None, False, False, False),
        ("torch==2.2.1+cu118", "torch", "2.2.1+cu118", None, True, False, False),
        (
            "git+https://github.com/org/repo@v1.2",
            "repo",
            None,
            "git+https://github.com/org/repo@v1.2",
            False,
            True,
            False,
        ),
        (
            "-e git+https://h.org/o/r.git@abc#egg=Foo_Bar",
            "foo-bar",
            None,
            "git+https://h.org/o/r.git@abc#egg=Foo_Bar",
            False,
            True,
            False,
        ),
        ("foo @ git+https://h.org/foo.git@v1", "foo", None, "git+https://h.org/foo.git@v1", False, True, False),
        (
            "https://x.org/f/x-1.0-cp39-cp39-win_amd64.whl",
            "x",
            None,
            "https://x.org/f/x-1.0-cp39-cp39-win_amd64.whl",
            False,
            False,
            False,
        ),
        ("https://x.org/src/pkg-2.0.tar.gz", "pkg", None, "https://x.org/src/pkg-2.0.tar.gz", False, False, False),
        ("-e .", None, None, None, False, False, True),
        ("./libs/mine", None, None, None, False, False, True),
        ("mylib @ file:///C:/Users/me/mylib-0.1-py3-none-any.whl", "mylib", None, None, False, False, True),
        ('rich[jupyter]>=13; python_version >= "3.8"', "rich", None, None, False, False, False),
    ],
)
def test_every_requirement_form_is_read(line, name, version, url, exact, vcs, local):
    pin = parse_pip_line(line)
    if name is not None:
        assert pin.name == name
    assert (pin.version, pin.url, pin.exact, pin.vcs, pin.local) == (version, url, exact, vcs, local)


def test_hash_options_ride_on_the_pin():
    pin = parse_pip_line("kbdemo==1.0+cu118 --hash=sha256:ab --hash sha256:cd")
    assert pin.exact and pin.hashed and pin.hashes == ("sha256:ab", "sha256:cd")
    assert pin.text == "kbdemo==1.0+cu118 --hash=sha256:ab --hash=sha256:cd"
    assert not parse_pip_line("kbdemo==1.0").hashed


@pytest.mark.parametrize(
    "line, option",
    [
        (
            "--extra-index-url https://download.pytorch.org/whl/cu118",
            ("extra_index_urls", "https://download.pytorch.org/whl/cu118"),
        ),
        ("--index-url=https://mirror/simple", ("index_url", "https://mirror/simple")),
        ("-i https://mirror/simple", ("index_url", "https://mirror/simple")),
        (
            "-f https://data.pyg.org/whl/torch-2.0.0+cu118.html",
            ("find_links", "https://data.pyg.org/whl/torch-2.0.0+cu118.html"),
        ),
        ("--find-links https://x/links", ("find_links", "https://x/links")),
        ("--trusted-host x.org", ("--trusted-host", "x.org")),
        ("numpy==1.0", None),
        ("-e git+https://h/r.git#egg=r", None),
    ],
)
def test_pip_options(line, option):
    assert parse_pip_option(line) == option
    if option is not None:
        assert parse_pip_line(line) is None  # an option is never a requirement


def _env(tmp_path, pip_lines: list[str], python: str = "3.11"):
    body = "".join(f"    - {json.dumps(line)}\n" for line in pip_lines)
    path = tmp_path / "environment.yml"
    path.write_text(f"name: x\nchannels: [conda-forge]\ndependencies:\n  - python={python}\n  - pip\n  - pip:\n{body}")
    raw = read_env_file(path)
    return raw, normalise(raw)


# (line, kept as, dropped or changed reason fragment)
LINUX_TABLE = [
    ("test-tube>=0.7.5", "test-tube>=0.7.5", None),
    ("tensorflow~=2.6.0", "tensorflow~=2.6.0", None),
    ("pyspng", "pyspng", None),
    ("git+https://github.com/org/repo@v1.2", "git+https://github.com/org/repo@v1.2", None),
    ("torch==2.2.1+cu118", "torch==2.2.1+cu118", None),
    (
        "https://x.org/f/x-1.0-cp39-cp39-manylinux2014_x86_64.whl",
        "https://x.org/f/x-1.0-cp39-cp39-manylinux2014_x86_64.whl",
        None,
    ),
    ("https://x.org/f/x-1.0-cp39-cp39-win_amd64.whl", None, "a Windows wheel (win_amd64); write `x==1.0`"),
    (
        "https://x.org/f/y-2.0-cp310-cp310-macosx_11_0_arm64.whl",
        None,
        "a macOS wheel (macosx_11_0_arm64); write `y==2.0`",
    ),
    ("-e .", None, LOCAL_REASON),
    ("/home/me/src/lib", None, LOCAL_REASON),
    ("tensorflow-macos==2.13.0", "tensorflow==2.13.0", "on Linux the same pin is tensorflow==2.13.0"),
    ("tensorflow-macos>=2.12", "tensorflow>=2.12", "on Linux the same pin is tensorflow>=2.12"),
    ("tensorflow-metal==1.0.1", None, "Metal GPU plug-in"),
    # Other OSes' wheels, however the URL is spelled.
    ("git+https://github.com/o/r/releases/download/v1/foo-1.0-cp38-cp38-win_amd64.whl", None, "a Windows wheel"),
    ("HTTPS://STORAGE.GOOGLEAPIS.COM/B/BAR-1.0-CP38-CP38-MACOSX_10_15_X86_64.WHL", None, "a macOS wheel"),
    ("https://storage.googleapis.com/b/baz-1.0-cp38-cp38-macosx_10_15_x86_64.whl?alt=media", None, "write `baz==1.0`"),
    ("https://x.org/f/q-1.0-cp38-cp38-macosx_10_15_x86_64.whl%3Fdl%3D1", None, "a macOS wheel"),
    ("https://x.org/f/torch-1.1.0%2Bcu100-cp37-cp37m-win_amd64.whl", None, "write `torch==1.1.0+cu100`"),
    (
        "https://storage.googleapis.com/tensorflow/mac/cpu/tensorflow-1.9.0-py3-none-any.whl",
        None,
        "a macOS wheel (any)",
    ),
    ("https://x.org/f/z-1.0-py3-none-any.whl", "https://x.org/f/z-1.0-py3-none-any.whl", None),
    # Names that refuse to install on PyPI.
    ("sklearn", "scikit-learn", "placeholder that refuses to install"),
    ("sklearn==0.0", "scikit-learn", "the project is scikit-learn"),
    ("skimage==0.0", "scikit-image", "the project is scikit-image"),
    ("tensorflow-gpu", "tensorflow", "the project is tensorflow"),
    ("tensorflow-gpu==2.12.0", "tensorflow==2.12.0", "the project is tensorflow"),
    ("tensorflow-gpu==2.4.1", "tensorflow-gpu==2.4.1", None),  # a real release
    # A local build no index serves cannot be fetched: its public release, said so.
    ("mylib==1.0+cu113", "mylib==1.0", "kbundle cannot fetch it"),
    ("pywin32==306", None, "installs only on Windows"),
    ('colorama==0.4.6; sys_platform == "win32"', None, "is false on linux-64"),
    ('tomli==2.0.1; python_version < "3.11"', None, "is false on linux-64"),
    ('exceptiongroup; python_version < "3.12"', 'exceptiongroup; python_version < "3.12"', None),
    ("torch==2.1.0+cpu", "torch==2.1.0+cpu", None),  # a real build an index serves
]


@pytest.mark.parametrize(
    "line, public",
    [
        ("mylib==1.4.2+g1a2b3c4.dirty", "mylib==1.4.2"),
        ("mylib==0.3.1.dev4+g9f8e7d6", "mylib==0.3.1.dev4"),
        ("mylib[extra]==2.0+dirty", "mylib[extra]==2.0"),
        ("mylib==1.0+g1a2b3c4.d20240101", "mylib==1.0"),
    ],
)
def test_a_senders_dev_build_is_relaxed_to_its_public_version(tmp_path, line, public):
    raw, env = _env(tmp_path, [line])
    assert [p.text for p in env.pip] == [public]
    (change,) = env.changed
    assert change.spec == f"pip: {line}" and change.to == public and "sender's own checkout" in change.reason


@pytest.mark.parametrize("line, kept, reason", LINUX_TABLE)
def test_pip_lines_for_linux(tmp_path, line, kept, reason):
    _, env = _env(tmp_path, [line])
    assert [p.text for p in env.pip] == ([kept] if kept else [])
    said = {d.spec: d.reason for d in env.dropped} | {c.spec: c.reason for c in env.changed}
    if reason:
        assert reason in said[f"pip: {line}"], said
    else:
        assert not [s for s in said if s.startswith("pip:")], said
    if kept and kept != line:  # a line carried in another form is a change, never a silent one
        assert {c.spec: c.to for c in env.changed}[f"pip: {line}"] == kept


def test_a_dead_name_already_in_the_environment_is_dropped(tmp_path):
    _, env = _env(tmp_path, ["scikit-learn==0.19.1", "sklearn==0.0"])
    assert [p.text for p in env.pip] == ["scikit-learn==0.19.1"]
    (gone,) = env.dropped
    assert gone.spec == "pip: sklearn==0.0" and "already in the environment" in gone.reason


# (the pip section, the indexes kbundle records, the note's fragment)
LOCAL_BUILD_TABLE = [
    (["torch==1.12.1+cu113", "torchvision==0.13.1+cu113"], ((), ("https://download.pytorch.org/whl/cu113",), ())),
    (["torch==1.8.2+cu111", "torchaudio==0.8.2"], ((), ("https://download.pytorch.org/whl/lts/1.8/cu111",), ())),
    (["torch==2.1.0+cpu"], ((), ("https://download.pytorch.org/whl/cpu",), ())),
    (["torch==2.0.1+rocm5.4.2"], ((), ("https://download.pytorch.org/whl/rocm5.4.2",), ())),
    (["torch-scatter==2.1.0+pt112cu113"], ((), (), ("https://data.pyg.org/whl/torch-1.12.0+cu113.html",))),
    (
        ["jaxlib==0.3.25+cuda11.cudnn82"],
        ((), (), ("https://storage.googleapis.com/jax-releases/jax_cuda_releases.html",)),
    ),
    # The section names an index: that one serves them; nothing is added.
    (
        ["--extra-index-url https://download.pytorch.org/whl/cu118", "torch==2.0.1+cu118"],
        ((), ("https://download.pytorch.org/whl/cu118",), ()),
    ),
    (["torch==2.0.1"], ((), (), ())),
]


@pytest.mark.parametrize("lines, expected", LOCAL_BUILD_TABLE)
def test_local_builds_get_the_index_that_serves_them(tmp_path, lines, expected):
    raw, env = _env(tmp_path, lines)
    index_url, extras, links = expected
    assert pip_indexes(raw) == PipIndexes(index_url or None, extras, links)
    notes = {a.spec for a in env.added if a.spec.startswith("pip: ")}
    named = any(line.startswith("-") for line in lines)
    assert notes == (
        set() if named else {f"pip: --extra-index-url {u}" for u in extras} | {f"pip: --find-links {u}" for u in links}
    )
    assert [p.text for p in env.pip] == [line for line in lines if not line.startswith("-")]


def test_index_options_become_pip_indexes_without_credentials(tmp_path):
    raw, env = _env(
        tmp_path,
        [
            "--extra-index-url https://download.pytorch.org/whl/cu118",
            "--index-url https://user:s3cret@mirror.corp/simple",
            "-f https://data.pyg.org/whl/torch-2.2.0+cu118.html",
            "--extra-index-url ./local-wheels",
            "-r other-requirements.txt",
            "torch==2.2.1+cu118",
        ],
    )
    dropped = []
    indexes = pip_indexes(raw, dropped)
    assert indexes == PipIndexes(
        "https://mirror.corp/simple",
        ("https://download.pytorch.org/whl/cu118",),
        ("https://data.pyg.org/whl/torch-2.2.0+cu118.html",),
    )
    assert "s3cret" not in json.dumps(indexes.to_dict()) + json.dumps([d.__dict__ for d in env.dropped])
    reasons = {d.spec: d.reason for d in env.dropped}
    assert reasons["pip: --extra-index-url ./local-wheels"] == LOCAL_REASON
    assert "list its lines" in reasons["pip: -r other-requirements.txt"]
    assert [p.text for p in env.pip] == ["torch==2.2.1+cu118"]
    assert PipIndexes.from_dict(indexes.to_dict()) == indexes


def test_indexes_reach_pip_through_its_environment_never_argv():
    indexes = PipIndexes("https://m/simple", ("https://a/simple", "https://b/simple"), ("https://f/",))
    env = indexes.environment({"PIP_EXTRA_INDEX_URL": "https://mine/simple", "PATH": "/bin"})
    assert env["PIP_INDEX_URL"] == "https://m/simple"
    assert env["PIP_EXTRA_INDEX_URL"] == "https://a/simple https://b/simple https://mine/simple"
    assert env["PIP_FIND_LINKS"] == "https://f/"
    assert PipIndexes().environment({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_requirements_file_options_are_read(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("--extra-index-url https://download.pytorch.org/whl/cu118\ntorch==2.2.1+cu118\n")
    raw = read_env_file(req, "3.11")
    assert pip_indexes(raw).extra_index_urls == ("https://download.pytorch.org/whl/cu118",)


def test_what_pip_can_lock_from_wheels():
    assert lockable(parse_pip_line("x>=1"))
    assert lockable(parse_pip_line("https://x.org/x-1.0-py3-none-any.whl"))
    assert not lockable(parse_pip_line("git+https://h/r.git@v1"))
    assert not lockable(parse_pip_line("https://x.org/x-1.0.tar.gz"))


def test_pins_from_a_pip_report():
    report = {
        "install": [
            {
                "metadata": {"name": "kbdemo", "version": "1.0+cu118"},
                "download_info": {"url": "http://i/kbdemo.whl", "archive_info": {"hashes": {"sha256": "aa"}}},
                "is_direct": False,
            },
            {
                "metadata": {"name": "x", "version": "1.0"},
                "download_info": {"url": "https://x.org/x-1.0-py3-none-any.whl", "archive_info": {"hash": "sha256=bb"}},
                "is_direct": True,
            },
        ]
    }
    assert [p.text for p in pins_from_report(report)] == [
        "kbdemo==1.0+cu118 --hash=sha256:aa",
        "x @ https://x.org/x-1.0-py3-none-any.whl --hash=sha256:bb",
    ]


def test_a_prefix_gives_exact_versions_and_vcs_commits(tmp_path):
    from kbundle.pack.prefix import read_prefix

    prefix = tmp_path / "env"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "conda-meta" / "python-3.11.7-h1.json").write_text(
        json.dumps({"name": "python", "version": "3.11.7", "build": "h1", "subdir": "linux-64", "files": []})
    )
    site = prefix / "lib" / "python3.11" / "site-packages"

    def dist(name, version, direct=None):
        d = site / f"{name}-{version}.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n")
        (d / "INSTALLER").write_text("pip\n")
        if direct:
            (d / "direct_url.json").write_text(json.dumps(direct))

    dist("test-tube", "0.7.5")
    dist("kbgit", "0.1", {"url": "https://h/kbgit.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}})
    dist("mine", "0.0.1", {"url": "file:///home/me/mine", "dir_info": {"editable": True}})
    raw = read_prefix(prefix, "conda-prefix")
    assert [p.text for p in raw.pip] == [
        "kbgit @ git+https://h/kbgit.git@abc123",
        "mine @ file:///home/me/mine",
        "test-tube==0.7.5",
    ]
    env = normalise(raw)
    assert [p.text for p in env.pip] == ["kbgit @ git+https://h/kbgit.git@abc123", "test-tube==0.7.5"]
    assert {d.reason for d in env.dropped if d.spec.startswith("pip:")} == {LOCAL_REASON}


def test_a_bare_url_naming_no_package_is_one_error():
    with pytest.raises(UsageError, match="egg="):
        parse_pip_line("https://example.org/download")


@pytest.mark.parametrize(
    "url, name",
    [
        ("https://h/files/x-1.0-py3-none-any.whl", "x-1.0-py3-none-any.whl"),
        ("https://h/files/x-1.0-py3-none-any.whl?token=1#sha256=ab", "x-1.0-py3-none-any.whl"),
        ("https://h/files/x%2B1-1.0.tar.gz", "x+1-1.0.tar.gz"),
        # issue 18: unquoted first, then split, so an encoded path is only its last name
        ("http://h/a/..%2F..%2F..%2Ftmp%2FX", "X"),
        ("http://h/a/%2E%2E%2F%2E%2E%2Froot%2F.bashrc", ".bashrc"),
    ],
)
def test_url_filename_is_one_plain_name(url, name):
    from kbundle.specs import url_filename

    assert url_filename(url) == name


@pytest.mark.parametrize(
    "url", ["http://h/a/..", "http://h/a/%2E%2E", "http://h/a/", "http://h/a/x%5C..%5Cy", "http://h/a%00b"]
)
def test_url_filename_refuses_what_is_no_file_name(url):
    from kbundle.errors import UnsafeName
    from kbundle.specs import url_filename

    with pytest.raises(UnsafeName):
        url_filename(url)
