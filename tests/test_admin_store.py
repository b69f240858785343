"""The admin policy store without a server: a bundle whose source files are gone is imported
with own documents that resolve to exactly the bundle's policies; versions only go up."""

from __future__ import annotations

import json
import shutil

import pytest
from serve_fixtures import EXAMPLE_POLICIES


def test_import_without_sources_resolves_to_the_same_policies(tmp_path):
    from aion_train.admin.store import PolicyStore, StoreError
    from aion_train.policy import build_bundle, write_bundle

    src = tmp_path / "src"
    src.mkdir()
    for p in EXAMPLE_POLICIES:
        shutil.copy(p, src / p.name)
    bundle = build_bundle(sorted(src.glob("*.json")))
    write_bundle(bundle, tmp_path / "b")
    shutil.rmtree(src)  # the files the bundle names are gone
    store = PolicyStore(tmp_path / "b")
    for j in ("eu", "eu-de"):
        doc = store.own_doc(j)
        assert store.validate(doc, j) == []
        assert store._resolve_with(doc)[j].sha256 == bundle["jurisdictions"][j]["sha256"]
    assert {e["action"] for e in store.history()} == {"import"}
    eu = store.own_doc("eu")
    with pytest.raises(StoreError) as e:
        store.publish("eu", eu, "alice")  # same version again
    assert e.value.status == 409
    entry = store.publish("eu", {**eu, "version": "1.0.1"}, "alice")
    on_disk = json.loads((tmp_path / "b" / "policy_bundle.json").read_text())
    assert on_disk["bundle_sha256"] == entry["bundle_sha256"] != bundle["bundle_sha256"]
    assert store.diff("eu", "1.0.0", "1.0.1").count("\n-") >= 1
