"""Python 3.7 has no pycache_prefix: its env is still byte-compiled, with checked-hash .pyc files.

The world's channel carries a CPython 3.7 (for TensorFlow 2.3.1); without .pyc files every kernel
start would compile TensorFlow again, in memory, since the env is read-only to the kernel.
"""

from __future__ import annotations

import pytest

from kbundle.image import bytecode

pytestmark = pytest.mark.docker


def test_a_python_37_env_is_byte_compiled_in_the_container(world, docker_client, tmp_path):
    import world as world_module

    if "3.7" not in world["pythons"]:
        pytest.fail("the world carries no Python 3.7 (KBUNDLE_WORLD_PYTHONS)")
    env = tmp_path / "env"
    world_module.solve_and_install(world["channel"], ["python=3.7"], env)
    assert bytecode._python_of(env) == (3, 7)
    stats = bytecode.compile_env(env, tmp_path / "pyc", "py37-test", client=docker_client, image=world["base_image"])
    assert stats.skipped is None and stats.compiled > 500, stats
    decoder = env / "lib" / "python3.7" / "json" / "decoder.py"
    pyc = bytecode._pyc_path(decoder, bytecode._cache_tag(env))
    assert pyc.name == "decoder.cpython-37.pyc" and pyc.parent.name == "__pycache__"
    header = pyc.read_bytes()[:16]
    assert int.from_bytes(header[4:8], "little") == 0b11  # checked hash (PEP 552), not a timestamp
    again = bytecode.compile_env(env, tmp_path / "pyc", "py37-test", client=docker_client, image=world["base_image"])
    assert again.compiled == 0 and again.linked >= stats.compiled  # the cache serves the second env
