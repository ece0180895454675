"""Pulling an image again: a layer whose diff_id (sha256 of its uncompressed tar) the store
recorded is not unpacked again, but only once its blob is seen to be that tar: an image
cannot name another image's layer by its diff_id and get it."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from corral.errors import InvalidImage, QuotaExceeded
from corral.images import LayerStore, oci
from tests.kit.oci_images import base_layer, layer, member, top_layer, write_layout

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts as trusted xattrs need root"),
]


def _diff_id(blob: bytes) -> str:
    return f"sha256:{hashlib.sha256(gzip.decompress(blob)).hexdigest()}"


def test_a_stored_layer_is_not_unpacked_again(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    blobs = [base_layer(), top_layer()]
    image = write_layout(tmp_path / "image", blobs)
    first = oci._import_layout(image, store, "test", None)
    for blob, digest in zip(blobs, first.layers, strict=True):
        found = store.layer_of_diff_id(_diff_id(blob))
        assert found is not None and found.digest == digest
    # Unpacking needs the store's staging dir: without one, only a skip succeeds.
    staging = store.root / "staging"
    staging.rename(tmp_path / "away")
    staging.symlink_to(tmp_path / "nowhere")
    try:
        again = oci._import_layout(image, store, "test", None)
    finally:
        staging.unlink()
        (tmp_path / "away").rename(staging)
    assert again == first
    # The quota still counts layers it did not unpack.
    with pytest.raises(QuotaExceeded, match="unpacks to more than 10 bytes"):
        oci._import_layout(image, store, "test", 10)


def test_an_image_naming_a_stored_layer_by_its_diff_id_does_not_get_it(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    secret = layer(member("etc/secret", b"another team's key\n"))
    oci._import_layout(write_layout(tmp_path / "theirs", [secret]), store, "theirs", None)
    before = store.layers()
    mine = layer(member("etc/mine", b"mine\n"))
    lying = write_layout(tmp_path / "lying", [mine], diff_ids=[_diff_id(secret)])
    with pytest.raises(InvalidImage, match="not the diff_id"):
        oci._import_layout(lying, store, "lying", None)
    assert store.layers() == before  # nothing stored, nothing handed out
    assert os.listdir(store.root / "staging") == []
