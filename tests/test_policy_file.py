"""One policy-file format for PPO and any SB3 policy (rudder.agents.policy_file): the zip bound to its sidecar."""

import json

import pytest
from rudder.agents.policy_file import (
    FORMAT,
    UntrustedPolicyError,
    file_sha256,
    read_policy,
    save_policy_files,
    sidecar_path,
)


class _Model:
    """Stands in for an SB3 model: ``save`` writes the zip."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.payload)


def test_saved_files_carry_the_format_hash_and_class_and_read_back(tmp_path):
    zip_path, side = save_policy_files(_Model(b"weights"), str(tmp_path / "sub" / "p"), dict(action="fraction", k=8))
    assert zip_path.endswith("p.zip") and side == sidecar_path(zip_path) == str(tmp_path / "sub" / "p.json")
    meta = json.loads(open(side).read())
    assert meta["format"] == FORMAT and meta["sha256"] == file_sha256(zip_path)
    assert meta["algorithm"] == "_Model" and meta["module"] == __name__ and meta["k"] == 8
    assert read_policy(str(tmp_path / "sub" / "p")) == (zip_path, meta)


def test_a_swapped_zip_is_refused_unless_trusted_and_foreign_json_is_named(tmp_path):
    zip_path, side = save_policy_files(_Model(b"weights"), str(tmp_path / "p.zip"), dict(action="link"))
    open(zip_path, "wb").write(b"other weights")
    with pytest.raises(UntrustedPolicyError, match=r"p\.zip: SHA-256 is [0-9a-f]{64} but .*p\.json records [0-9a-f]"):
        read_policy(zip_path)
    assert read_policy(zip_path, trust=True)[1]["action"] == "link"
    json.dump({"format": "something/2"}, open(side, "w"))
    with pytest.raises(ValueError, match="not a rudder policy sidecar: format expected rudder-policy/1, got 'so"):
        read_policy(zip_path, trust=True)
    with pytest.raises(FileNotFoundError, match=r"policy file .*q\.zip not found \(make one\)"):
        read_policy(str(tmp_path / "q"), hint="make one")


def test_sidecars_from_before_the_shared_format_are_read(tmp_path):
    zip_path, side = save_policy_files(_Model(b"w"), str(tmp_path / "old.zip"), {})
    for earlier in ("rudder-ppo-policy/1", "rudder-sb3-policy/1"):
        meta = json.load(open(side))
        json.dump(dict(meta, format=earlier), open(side, "w"))
        assert read_policy(zip_path)[1]["format"] == earlier
    meta.pop("sha256")
    json.dump(meta, open(side, "w"))  # an SB3 sidecar of before recorded no hash: loading it needs trust
    with pytest.raises(UntrustedPolicyError, match="records no sha256"):
        read_policy(zip_path)
