"""The one slug rule (kbundle.names): bundle, kernel and image names from a person's text.
Accented Latin letters keep their base letter (NFKD, and a small table for the letters NFKD does
not split); what has no Latin spelling is dropped."""

from __future__ import annotations

import json

import pytest

from helpers import kbundle, notebook
from kbundle.bundle.schema import NAME
from kbundle.names import slug, transliterate


@pytest.mark.parametrize(
    "text, expected",
    [
        ("análisis de datos ñ", "analisis-de-datos-n"),
        ("Straße", "strasse"),
        ("STRAẞE", "strasse"),
        ("Ærø", "aero"),
        ("Øresund", "oresund"),
        ("Łódź", "lodz"),
        ("cœur", "coeur"),
        ("Þór Guðmundsson", "thor-gudmundsson"),
        ("Đorđe", "dorde"),
        ("İstanbul", "istanbul"),
        ("ÜBER analysis", "uber-analysis"),
        ("crème brûlée", "creme-brulee"),
        ("ﬁnal ①", "final-1"),  # compatibility forms: the ligature and the circled digit
        ("Ｗｉｄｅ", "wide"),  # full-width letters
        ("tf-warp-speed", "tf-warp-speed"),  # ASCII names are unchanged
        ("My Notebook!", "my-notebook"),
        ("v1.2_final", "v1.2_final"),
        ("日本語", "bundle"),  # no Latin spelling: the fallback
        ("データ analysis", "analysis"),
        ("---", "bundle"),
        ("", "bundle"),
    ],
)
def test_slug_transliterates(text, expected):
    assert slug(text) == expected
    assert NAME.fullmatch(slug(text, limit=63))


@pytest.mark.parametrize("text, expected", [("ñ", "n"), ("ß", "ss"), ("æ", "ae"), ("ø", "o"), ("ł", "l")])
def test_transliterate_table(text, expected):
    assert transliterate(text) == expected
    assert transliterate(text.upper()) == expected.lower()


def test_slug_limits_and_trims_after_transliterating():
    assert slug("é" * 100, limit=10) == "e" * 10
    assert slug("ab-ß-", limit=5) == "ab-ss"
    assert slug("ab ñ", limit=3) == "ab"  # never ends in a separator


def test_a_spanish_notebook_name_packs_as_its_transliteration(tmp_path):
    nb = notebook(tmp_path, name="análisis de datos ñ.ipynb")
    env = tmp_path / "environment.yml"
    env.write_text("dependencies:\n  - python=3.11\n")
    result = kbundle("pack", nb, "-e", env, "--lock", "never", "--cuda", "none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "análisis de datos ñ.kbundle"
    assert json.loads(kbundle("inspect", out, "--json").stdout)["name"] == "analisis-de-datos-n"
    assert "kbundle run 'análisis de datos ñ.kbundle'" in result.stdout
