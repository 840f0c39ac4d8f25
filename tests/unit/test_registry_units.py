"""Pure logic of the registry client: loopback hosts, challenges, auth.json, platforms, stage
records from a pulled image's labels (references: test_reference.py)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from sysbake.build.cache import Origin
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Image, Layer
from sysbake.registry.auth import (
    Challenge,
    Credentials,
    RegistryError,
    auth_files,
    default_auth_file,
    lookup_credentials,
    normalize_key,
    parse_challenges,
    parse_creds,
    pick_challenge,
    remove_credentials,
    save_credentials,
)
from sysbake.registry.client import is_loopback
from sysbake.registry.seed import stage_records
from sysbake.registry.transfer import host_platform, select_platform

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


# -- hosts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("localhost:80", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("reg.example", False),
        ("localhost.example:5", False),
    ],
)
def test_is_loopback(registry: str, loopback: bool) -> None:
    assert is_loopback(registry) is loopback


# -- challenges and credentials -----------------------------------------------------------------


def test_parse_bearer_challenge() -> None:
    [c] = parse_challenges(
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:team/web:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.get("realm") == "https://auth.example/token"
    assert c.get("service") == "reg.example"
    assert c.get("scope") == "repository:team/web:pull,push"


def test_parse_several_challenges_and_odd_syntax() -> None:
    challenges = parse_challenges(
        'Basic realm="Registry \\"A\\"", charset=UTF-8 ,'
        " Bearer realm=https://t.example/x, NewScheme abc==, "
        "Other"
    )
    assert [c.scheme for c in challenges] == ["basic", "bearer", "newscheme", "other"]
    assert challenges[0].get("realm") == 'Registry "A"'
    assert challenges[0].get("charset") == "UTF-8"
    assert challenges[1].get("realm") == "https://t.example/x"
    assert pick_challenge(challenges) == challenges[1]
    assert pick_challenge(challenges[:1]) == challenges[0]
    assert pick_challenge([Challenge("negotiate")]) is None
    assert parse_challenges("") == []


def test_parse_creds_and_basic_header() -> None:
    assert parse_creds("ann:s3:cr:et") == ("ann", "s3:cr:et")
    assert parse_creds("ann") == ("ann", None)
    assert parse_creds("ann:") == ("ann", "")
    with pytest.raises(RegistryError, match="USER"):
        parse_creds(":pw")
    header = Credentials("ann", "pw").basic()
    assert base64.b64decode(header.removeprefix("Basic ")) == b"ann:pw"


def test_auth_file_locations_follow_podman() -> None:
    assert default_auth_file({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/user/7/containers/auth.json"
    )
    assert default_auth_file({}) == Path(f"/run/containers/{os.getuid()}/auth.json")
    assert default_auth_file({"REGISTRY_AUTH_FILE": "/x/a.json", "XDG_RUNTIME_DIR": "/r"}) == Path(
        "/x/a.json"
    )
    env = {"HOME": "/home/ann", "XDG_RUNTIME_DIR": "/r"}
    assert auth_files(None, env) == [
        Path("/r/containers/auth.json"),
        Path("/home/ann/.config/containers/auth.json"),
        Path("/home/ann/.docker/config.json"),
    ]
    env |= {"DOCKER_CONFIG": "/d", "XDG_CONFIG_HOME": "/c"}
    assert auth_files(None, env)[1:] == [Path("/c/containers/auth.json"), Path("/d/config.json")]
    assert auth_files(Path("/only.json"), env) == [Path("/only.json")]
    assert auth_files(None, env | {"REGISTRY_AUTH_FILE": "/e.json"}) == [Path("/e.json")]


def test_save_lookup_remove_credentials(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "auth.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"auths": {}, "credHelpers": {"x": "y"}}))
    save_credentials(path, "127.0.0.1:5000", Credentials("ann", "p:w"))
    save_credentials(path, "reg.example", Credentials("bob", "pw2"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["credHelpers"] == {"x": "y"}  # other keys are kept
    assert doc["auths"]["127.0.0.1:5000"] == {"auth": base64.b64encode(b"ann:p:w").decode()}
    assert lookup_credentials("127.0.0.1:5000", "web", [path]) == Credentials("ann", "p:w")
    assert lookup_credentials("127.0.0.1:5001", "web", [path]) is None
    save_credentials(path, "127.0.0.1:5000", Credentials("ann", "new"))
    assert lookup_credentials("127.0.0.1:5000", "web", [path]) == Credentials("ann", "new")
    assert remove_credentials(path, "127.0.0.1:5000") is True
    assert remove_credentials(path, "127.0.0.1:5000") is False
    assert lookup_credentials("127.0.0.1:5000", "web", [path]) is None
    assert remove_credentials(path, None) is True
    assert json.loads(path.read_text())["auths"] == {}
    assert remove_credentials(tmp_path / "missing.json", None) is False


def test_lookup_prefers_specific_keys_and_reads_docker_config(tmp_path: Path) -> None:
    def auth(text: str) -> dict[str, str]:
        return {"auth": base64.b64encode(text.encode()).decode()}

    podman, docker = tmp_path / "auth.json", tmp_path / "config.json"
    podman.write_text(
        json.dumps(
            {
                "auths": {
                    "reg.example": auth("host:1"),
                    "reg.example/team": auth("team:2"),
                    "reg.example/team/web": auth("web:3"),
                }
            }
        )
    )
    docker.write_text(
        json.dumps(
            {
                "auths": {
                    "https://other.example/v1/": auth("dock:4"),
                    "plain.example:5000": {"username": "u", "password": "p"},
                    "helper.example": {},
                }
            }
        )
    )
    files = [podman, tmp_path / "absent.json", docker]
    assert lookup_credentials("reg.example", "team/web", files) == Credentials("web", "3")
    assert lookup_credentials("reg.example", "team/api", files) == Credentials("team", "2")
    assert lookup_credentials("reg.example", "teams", files) == Credentials("host", "1")
    assert lookup_credentials("other.example", "x", files) == Credentials("dock", "4")
    assert lookup_credentials("plain.example:5000", "x", files) == Credentials("u", "p")
    # An entry whose secret is kept by a credential helper: anonymous, not an error.
    assert lookup_credentials("helper.example", "x", files) is None
    assert normalize_key("http://h:5/v2/") == "h:5"


def test_broken_auth_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text("{not json")
    with pytest.raises(RegistryError, match=str(path)):
        lookup_credentials("reg.example", "x", [path])
    path.write_text(json.dumps({"auths": {"reg.example": {"auth": "!!!"}}}))
    with pytest.raises(RegistryError, match=r"auths\.reg\.example"):
        lookup_credentials("reg.example", "x", [path])


# -- platforms ----------------------------------------------------------------------------------


def _index(*platforms: dict[str, str]) -> dict[str, object]:
    return {
        "manifests": [
            {"mediaType": oci.MT_MANIFEST, "digest": f"sha256:{i:064x}", "size": 1, "platform": p}
            for i, p in enumerate(platforms)
        ]
    }


def test_select_platform() -> None:
    index = _index(
        {"os": "linux", "architecture": "arm", "variant": "v6"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "windows", "architecture": "amd64"},
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    )
    assert select_platform(index, ("linux", "amd64", None), "x")["digest"].endswith("3")
    assert select_platform(index, ("linux", "arm", "v7"), "x")["digest"].endswith("1")
    assert select_platform(index, ("linux", "arm64", None), "x")["digest"].endswith("4")
    with pytest.raises(RegistryError, match=r"no image for linux/s390x .*linux/amd64"):
        select_platform(index, ("linux", "s390x", None), "x")
    with pytest.raises(RegistryError, match="no platforms"):
        select_platform({"manifests": []}, ("linux", "amd64", None), "x")


def test_host_platform_is_oci_naming() -> None:
    os_name, arch, _ = host_platform()
    assert os_name == "linux"
    assert arch in ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64")


# -- stage records from labels ------------------------------------------------------------------


def _image(labels: dict[str, str], comments: list[str]) -> Image:
    layers = tuple(
        Layer(Descriptor(oci.MT_LAYER_GZIP, f"sha256:{i + 10:064x}", 5), f"sha256:{i + 20:064x}")
        for i in range(len(comments))
    )
    history: list[dict[str, object]] = [
        {"created": f"2026-01-0{i + 1}T00:00:00Z", "created_by": f"step {i}", "comment": c}
        for i, c in enumerate(comments)
    ]
    history.insert(1, {"created": "x", "empty_layer": True})
    config = {
        "config": {"Labels": labels},
        "history": history,
        "rootfs": {"diff_ids": [la.diff_id for la in layers]},
    }
    desc = Descriptor(oci.MT_CONFIG, D2, 1)
    return Image(Descriptor(oci.MT_MANIFEST, D1, 1), desc, config, layers)


def test_stage_records_map_labels_to_layers() -> None:
    boot, system, other = "a" * 64, "b" * 64, "c" * 64
    image = _image(
        {
            "io.sysbake.stage.bootstrap": boot,
            "io.sysbake.stage.system": system,
            "io.sysbake.stage.x": other,
            "io.sysbake.image": "web",
        },
        [f"sysbake bootstrap {boot[:16]}", "imported by hand", f"sysbake system {system[:16]}"],
    )
    origin = Origin("reg.example", "web", D1)
    records = stage_records(image, origin)
    assert [(r.stage, r.key, r.layer) for r in records] == [
        ("bootstrap", boot, image.layers[0]),
        ("system", system, image.layers[2]),
    ]
    assert records[0].image == "web"
    assert records[0].created == "2026-01-01T00:00:00Z"
    assert records[1].created_by == "step 2"
    assert records[0].inputs == {"cache_from": f"reg.example/web@{D1}"}
    assert {r.origin for r in records} == {origin}


def test_stage_records_skip_what_they_cannot_prove() -> None:
    key = "a" * 64
    origin = Origin("r.example", "x", D1)
    # A history that does not line up with the layers proves nothing.
    image = _image({"io.sysbake.stage.bootstrap": key}, [f"sysbake bootstrap {key[:16]}"])
    broken = Image(
        image.manifest, image.config_descriptor, {**image.config, "history": []}, image.layers
    )
    assert stage_records(broken, origin) == []
    # A comment whose key prefix matches no label, or two labels.
    twin = "a" * 16 + "f" * 48
    image = _image(
        {"io.sysbake.stage.a": key, "io.sysbake.stage.b": twin},
        [f"sysbake a {key[:16]}", f"sysbake z {'e' * 16}"],
    )
    assert stage_records(image, origin) == []
    assert stage_records(_image({}, [f"sysbake a {key[:16]}"]), origin) == []
    # Two layers claiming one key: neither is the one the source published for it.
    image = _image({"io.sysbake.stage.a": key}, [f"sysbake a {key[:16]}", f"sysbake a {key[:16]}"])
    assert stage_records(image, origin) == []
    # A comment naming another stage than the label that holds the key.
    image = _image({"io.sysbake.stage.a": key}, [f"sysbake bootstrap {key[:16]}"])
    assert stage_records(image, origin) == []


# -- command-line helpers -----------------------------------------------------------------------


def test_cli_option_parsers() -> None:
    import argparse

    from sysbake.commands.registry import _platform, _registry_arg, _tls_verify
    from sysbake.errors import SysbakeError

    assert _tls_verify("false") is False and _tls_verify("True") is True
    with pytest.raises(argparse.ArgumentTypeError):
        _tls_verify("maybe")
    assert _platform("linux/arm/v7") == ("linux", "arm", "v7")
    assert _platform("linux/amd64") == ("linux", "amd64", None)
    assert _platform(None) is None
    with pytest.raises(SysbakeError, match="OS/ARCH"):
        _platform("amd64")
    assert _registry_arg("https://Reg.Example:5000/v2/") == "reg.example:5000"
    with pytest.raises(SysbakeError, match="HOST"):
        _registry_arg("reg.example/team")
