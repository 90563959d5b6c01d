"""Which chain step images `kbundle gc` plans to remove (kernel/gc.py `_unused_chain_steps`), against
a stand-in engine: the planning alone, no image is removed."""

from __future__ import annotations

from kbundle import contract
from kbundle.image import chain, ledger
from kbundle.kernel import gc

NOW = 1_000_000.0
OLD = NOW - gc.STALE_AFTER_S - 1


class _Api:
    def __init__(self, images, containers=()):
        self._images = images
        self._containers = list(containers)

    def images(self, **_):
        return self._images

    def containers(self, **_):
        return self._containers

    def history(self, image_id):
        return [{}] * next(i["depth"] for i in self._images if i["Id"] == image_id)


class _Client:
    def __init__(self, api):
        self.api = api


def _step(group: str, depth: int, created: float = OLD) -> dict:
    tag = f"{chain.STEP_REPO}/{group}:{depth:016x}"
    return {
        "Id": f"sha256:{group}",
        "RepoTags": [tag],
        "Labels": {chain.LABEL_STEP: group},
        "Created": created,
        "depth": depth,
    }


def _final(tag: str, steps: list[dict]) -> dict:
    labels = {
        contract.LABEL_CONTENT_HASH: "h",
        chain.LABEL_STEP: "",
        chain.LABEL_STEPS: " ".join(s["RepoTags"][0] for s in steps),
    }
    return {"Id": f"sha256:{tag}", "RepoTags": [tag], "Labels": labels, "Created": OLD, "depth": 9}


STEPS = [_step("base", 1), _step("cuda", 2), _step("python", 3)]


def _plan(monkeypatch, images, removing=(), idle=True, containers=()):
    monkeypatch.setattr(ledger, "entries", lambda: {s["Id"]: None for s in images})
    items, present = gc._unused_chain_steps(_Client(_Api(images, containers)), set(removing), set(), NOW, idle)
    return [i.ref for i in items], present


def test_steps_an_image_left_on_the_engine_is_built_on_are_kept(monkeypatch):
    refs, present = _plan(monkeypatch, [*STEPS, _final("kbundle/a:1", STEPS)])
    assert refs == [] and present == {s["Id"] for s in STEPS}


def test_steps_of_images_the_plan_removes_go_after_them_top_first(monkeypatch):
    refs, _ = _plan(monkeypatch, [*STEPS, _final("kbundle/a:1", STEPS)], removing={"kbundle/a:1"})
    assert refs == [s["RepoTags"][0] for s in reversed(STEPS)]


def test_a_step_another_image_shares_stays(monkeypatch):
    other = _final("kbundle/b:1", STEPS[:2])
    refs, _ = _plan(monkeypatch, [*STEPS, _final("kbundle/a:1", STEPS), other], removing={"kbundle/a:1"})
    assert refs == [STEPS[2]["RepoTags"][0]]


def test_young_steps_wait_while_a_kbundle_run_may_be_building_on_them(monkeypatch):
    young = [_step("base", 1, NOW - 5)]
    assert _plan(monkeypatch, young, idle=False)[0] == []
    assert _plan(monkeypatch, young, idle=True)[0] == [young[0]["RepoTags"][0]]


def test_a_step_a_container_uses_stays(monkeypatch):
    refs, _ = _plan(monkeypatch, STEPS[:1], containers=[{"Id": "c", "ImageID": STEPS[0]["Id"]}])
    assert refs == []


def test_steps_another_user_made_are_not_candidates(monkeypatch):
    monkeypatch.setattr(ledger, "entries", lambda: {})
    items, present = gc._unused_chain_steps(_Client(_Api(STEPS)), set(), set(), NOW, True)
    assert items == [] and present == set()
