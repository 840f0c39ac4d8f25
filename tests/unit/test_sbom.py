"""SBOMs: dpkg status parsing, DEP-5 licence extraction, licence expressions, purls, the
SPDX and CycloneDX documents (checked by the reference validators from PyPI), and images
read through sysbake.rootfs.Root, hostile ones included (a status file that is a link to a
host file, a copyright file that is a FIFO, a link to a host file, or too large)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from sysbake.oci.store import Store
from sysbake.supply import SupplyError, inventory, licences, packages, sbom
from sysbake.supply.inventory import Inventory, LayerInfo, Package
from sysbake.supply.licences import Licence
from sysbake.supply.packages import DebPackage, PyDist
from tests.unit.conftest import crafted_tar, put_image

DEP5_FORMAT = "Format: https://dep5.invalid/doc/packaging-manuals/copyright-format/1.0/\n"

STATUS = b"""\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u4
Description: GNU C Library: Shared libraries
 Contains the standard libraries.

Package: nginx
Status: install ok installed
Architecture: amd64
Source: nginx (1.22.1-9)
Version: 1.22.1-9
Depends: libc6

Package: gone
Status: deinstall ok config-files
Architecture: all
Version: 1.0

Package: libc6
Status: install ok installed
Architecture: i386
Source: glibc
Version: 2.36-9+deb12u4

Package: perl-base
Status: hold ok installed
Architecture: amd64
Source: perl (5.36.0-7)
Version: 5.36.0-7+deb12u1
"""


# -- dpkg status ------------------------------------------------------------------------------


def test_status_lists_installed_packages_sorted_with_their_source() -> None:
    found = packages.parse_status(STATUS, "status")
    assert found == [
        DebPackage("libc6", "2.36-9+deb12u4", "amd64", "glibc"),
        DebPackage("libc6", "2.36-9+deb12u4", "i386", "glibc"),
        DebPackage("nginx", "1.22.1-9", "amd64", "nginx"),
        DebPackage("perl-base", "5.36.0-7+deb12u1", "amd64", "perl", "5.36.0-7"),
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            b"Status: install ok installed\nVersion: 1\n",
            "status: line 1: a paragraph without a Package field",
        ),
        (b" continued\nPackage: a\n", "status: line 1: a continuation line with no field"),
        (b"Package: a\nthis is no field\n", "status: line 2: expected 'Field: value'"),
        (
            b"Package: a\n\nPackage: b\nStatus: install ok installed\nArchitecture: all\n",
            "line 3: installed package b has no Version",
        ),
    ],
)
def test_a_malformed_status_file_is_one_line_naming_the_line(text: bytes, error: str) -> None:
    with pytest.raises(SupplyError) as caught:
        packages.parse_status(text, "status")
    assert error in str(caught.value)
    assert "\n" not in str(caught.value)


# -- DEP-5 and licence expressions ----------------------------------------------------------------


def test_dep5_licences_are_the_header_and_files_paragraphs_synopses() -> None:
    text = (
        DEP5_FORMAT + "Upstream-Name: demo\nLicense: GPL-2+\n\n"
        "Files: *\nCopyright: 2020 A\nLicense: GPL-2+\n\n"
        "Files: lib/*\nCopyright: 2021 B\nLicense: LGPL-2.1+ or Artistic\n Some text.\n\n"
        "License: GPL-2+\n On Debian systems the full text is in common-licenses.\n\n"
        "License: BSD-3-clause\n A licence no Files paragraph uses.\n"
    ).encode()
    assert packages.dep5_licences(text) == ("GPL-2+", "LGPL-2.1+ or Artistic")


def test_a_free_form_copyright_file_has_no_licences() -> None:
    assert packages.dep5_licences(b"This is demo, written by A.\n\nLicense: GPL\n") is None
    assert packages.dep5_licences(b"") is None


@pytest.mark.parametrize(
    ("synopses", "expression", "refs"),
    [
        (["GPL-2+"], "GPL-2.0-or-later", ()),
        (["Expat"], "MIT", ()),
        (["LGPL-2.1+ or Artistic"], "LGPL-2.1-or-later OR Artistic-1.0-Perl", ()),
        (["BSD-3-clause", "GPL-2+"], "BSD-3-Clause AND GPL-2.0-or-later", ()),
        (
            ["GPL-2+ or Artistic, and BSD-3-clause"],
            "(GPL-2.0-or-later OR Artistic-1.0-Perl) AND BSD-3-Clause",
            (),
        ),
        (
            ["public-domain"],
            "LicenseRef-public-domain",
            (("LicenseRef-public-domain", "public-domain"),),
        ),
        (
            ["GPL-2+ with OpenSSL exception"],
            "LicenseRef-GPL-2--with-OpenSSL-exception",
            (("LicenseRef-GPL-2--with-OpenSSL-exception", "GPL-2+ with OpenSSL exception"),),
        ),
        (
            ["MIT", "Zlib or public-domain"],
            "MIT AND (Zlib OR LicenseRef-public-domain)",
            (("LicenseRef-public-domain", "public-domain"),),
        ),
    ],
)
def test_debian_synopses_become_spdx_expressions(
    synopses: list[str], expression: str, refs: tuple[tuple[str, str], ...]
) -> None:
    assert licences.debian_licence(synopses) == Licence(expression, refs)


def test_no_synopsis_is_no_licence() -> None:
    assert licences.debian_licence([]) is None


def test_every_identifier_the_tables_produce_is_a_known_spdx_and_cyclonedx_id() -> None:
    from license_expression import get_spdx_licensing  # type: ignore[import-untyped]

    spdx_known = {s.key for s in get_spdx_licensing().known_symbols.values()}
    import cyclonedx

    schema = Path(cyclonedx.__file__).parent / "schema" / "_res" / "spdx.SNAPSHOT.schema.json"
    cdx_known = set(json.loads(schema.read_text())["enum"])
    used = set(licences.DEBIAN_NAMES.values()) | set(licences.CLASSIFIERS.values())
    assert used - spdx_known == set()
    assert used - cdx_known == set()


def test_python_licences_come_from_the_expression_classifiers_or_a_short_name() -> None:
    assert licences.python_licence("mit OR (Apache-2.0 AND bsd-3-clause)", "", ()) == Licence(
        "MIT OR (Apache-2.0 AND BSD-3-Clause)"
    )
    classifiers = (
        "License :: OSI Approved :: Apache Software License",
        "License :: OSI Approved :: BSD License",
        "License :: OSI Approved :: MIT License",
    )
    assert licences.python_licence("", "", classifiers) == Licence("Apache-2.0 OR MIT")
    assert licences.python_licence("Weird-1.0", "Apache 2.0", ()) is None
    assert licences.python_licence("", "BSD-3-Clause", ()) == Licence("BSD-3-Clause")
    assert licences.python_licence("", "Long text\nof a licence", ()) is None


# -- Python METADATA, os-release, purls -----------------------------------------------------------


def test_metadata_header_fields_stop_at_the_description() -> None:
    text = (
        b"Metadata-Version: 2.1\nName: Salt_Stack\nVersion: 3007.16\nLicense: Apache 2.0\n"
        b"Classifier: Programming Language :: Python\n"
        b"Classifier: License :: OSI Approved :: Apache Software License\n\n"
        b"Name: not-a-header\n"
    )
    assert packages.parse_metadata(text, "m") == PyDist(
        "Salt_Stack",
        "3007.16",
        "",
        "Apache 2.0",
        ("License :: OSI Approved :: Apache Software License",),
    )
    with pytest.raises(SupplyError, match="m: expected Name and Version"):
        packages.parse_metadata(b"Name: x\n", "m")


def test_purls_encode_epochs_and_pluses_and_name_the_source() -> None:
    pkg = DebPackage("perl-base", "1:5.36.0-7+deb12u1", "amd64", "perl", "5.36.0-7")
    assert packages.deb_purl(pkg, "debian", "12") == (
        "pkg:deb/debian/perl-base@1%3A5.36.0-7%2Bdeb12u1"
        "?arch=amd64&distro=debian-12&upstream=perl%405.36.0-7"
    )
    assert packages.deb_purl(DebPackage("nginx", "1.22.1-9", "amd64", "nginx")) == (
        "pkg:deb/debian/nginx@1.22.1-9?arch=amd64"
    )
    assert packages.pypi_purl(PyDist("Salt_Stack.x", "3007.16")) == "pkg:pypi/salt-stack-x@3007.16"
    assert packages.parse_os_release(b'ID=debian\nVERSION_ID="12"\n# x=y\n') == {
        "ID": "debian",
        "VERSION_ID": "12",
    }


# -- documents, checked by the reference validators ---------------------------------------------


def _inventory() -> Inventory:
    layers = (
        LayerInfo(0, "sha256:" + "a" * 64, "bootstrap"),
        LayerInfo(1, "sha256:" + "b" * 64, "site"),
    )
    gpl = Licence(
        "GPL-2.0-or-later OR LicenseRef-public-domain",
        (("LicenseRef-public-domain", "public-domain"),),
    )
    pkgs = (
        Package(
            "deb",
            "libc6",
            "2.36-9",
            "pkg:deb/debian/libc6@2.36-9?arch=amd64",
            0,
            "amd64",
            "glibc",
            "",
            licences.Licence("LGPL-2.1-or-later"),
        ),
        Package(
            "deb", "libc6", "2.36-9", "pkg:deb/debian/libc6@2.36-9?arch=i386", 0, "i386", "glibc"
        ),
        Package(
            "deb",
            "nginx",
            "1.22.1-9",
            "pkg:deb/debian/nginx@1.22.1-9?arch=amd64",
            1,
            "amd64",
            "nginx",
            "",
            gpl,
        ),
        Package(
            "python",
            "salt",
            "3007.16",
            "pkg:pypi/salt@3007.16",
            1,
            licence=Licence("Apache-2.0"),
            location="/opt/a/salt-3007.16.dist-info",
        ),
        Package(
            "python",
            "salt",
            "3007.16",
            "pkg:pypi/salt@3007.16",
            1,
            location="/opt/b/salt-3007.16.dist-info",
        ),
    )
    return Inventory(
        "web:latest",
        "sha256:" + "c" * 64,
        "sha256:" + "d" * 64,
        "2024-05-01T10:20:30.123+02:00",
        "amd64",
        "debian",
        "12",
        layers,
        pkgs,
    )


def _spdx_problems(doc: dict[str, Any]) -> list[str]:
    from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    parsed = JsonLikeDictParser().parse(doc)  # type: ignore[no-untyped-call]
    return [m.validation_message for m in validate_full_spdx_document(parsed)]


def test_the_spdx_document_passes_spdx_tools_validation() -> None:
    doc = json.loads(sbom.render(_inventory(), "spdx-json"))
    assert _spdx_problems(doc) == []
    assert doc["creationInfo"]["created"] == "2024-05-01T08:20:30Z"
    nginx = next(p for p in doc["packages"] if p["name"] == "nginx")
    assert nginx["licenseDeclared"] == "GPL-2.0-or-later OR LicenseRef-public-domain"
    assert "layer 1 (sha256:bbbb" in nginx["comment"] and "stage site" in nginx["comment"]
    assert [x["licenseId"] for x in doc["hasExtractedLicensingInfos"]] == [
        "LicenseRef-public-domain"
    ]
    assert len({p["SPDXID"] for p in doc["packages"]}) == len(doc["packages"]) == 6


def test_the_spdx_validator_is_not_a_rubber_stamp() -> None:
    doc = json.loads(sbom.render(_inventory(), "spdx-json"))
    del doc["hasExtractedLicensingInfos"]  # a LicenseRef used but not declared
    assert _spdx_problems(doc) != []


def test_the_cyclonedx_document_passes_the_strict_json_validator() -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    text = sbom.render(_inventory(), "cyclonedx-json").decode()
    validator = JsonStrictValidator(SchemaVersion.V1_5)
    assert validator.validate_str(text) is None
    doc = json.loads(text)
    assert len({c["bom-ref"] for c in doc["components"]}) == 5
    nginx = next(c for c in doc["components"] if c["name"] == "nginx")
    props = {p["name"]: p["value"] for p in nginx["properties"]}
    assert props["sysbake:stage"] == "site" and props["sysbake:layer-index"] == "1"
    doc["components"][0]["licenses"] = [{"license": {"id": "Not-An-SPDX-Id"}}]
    assert validator.validate_str(json.dumps(doc)) is not None


def test_the_same_inventory_gives_the_same_bytes() -> None:
    for fmt in sbom.FORMATS:
        assert sbom.render(_inventory(), fmt) == sbom.render(_inventory(), fmt)


# -- images ----------------------------------------------------------------------------------------

GPL_COPYRIGHT = (DEP5_FORMAT + "\nFiles: *\nCopyright: 2020 A\nLicense: GPL-2+\n").encode()
NGINX_STATUS = (
    b"Package: nginx\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.22.1-9\n"
)


def _reg(name: str, data: bytes) -> tuple[str, bytes, dict[str, object]]:
    return (name, tarfile.REGTYPE, {"data": data})


def _dirs(*names: str) -> list[tuple[str, bytes, dict[str, object]]]:
    return [(n, tarfile.DIRTYPE, {}) for n in names]


BASE_DIRS = _dirs("etc", "usr", "usr/share", "usr/share/doc", "var", "var/lib", "var/lib/dpkg")


def test_a_single_layer_image_lists_its_packages_and_licences(store: Store) -> None:
    layer = crafted_tar(
        *BASE_DIRS,
        _reg("etc/os-release", b'ID=debian\nVERSION_ID="12"\n'),
        _reg("var/lib/dpkg/status", NGINX_STATUS),
        *_dirs("usr/share/doc/nginx"),
        _reg("usr/share/doc/nginx/copyright", GPL_COPYRIGHT),
    )
    put_image(store, layer, ref="hsup-one:1", created="2024-01-02T03:04:05Z")
    inv = inventory.inventory(store, "hsup-one:1")
    assert [(p.name, p.version, p.purl, p.layer) for p in inv.packages] == [
        ("nginx", "1.22.1-9", "pkg:deb/debian/nginx@1.22.1-9?arch=amd64&distro=debian-12", 0)
    ]
    assert inv.packages[0].licence == Licence("GPL-2.0-or-later")
    assert inv.created == "2024-01-02T03:04:05Z"


def test_a_status_file_linked_to_a_host_file_is_one_line(store: Store, tmp_path: Path) -> None:
    host = tmp_path / "host-status"
    host.write_bytes(NGINX_STATUS)
    layer = crafted_tar(
        *BASE_DIRS, ("var/lib/dpkg/status", tarfile.SYMTYPE, {"linkname": str(host)})
    )
    put_image(store, layer, ref="hsup-link:1")
    with pytest.raises(SupplyError) as caught:
        inventory.inventory(store, "hsup-link:1")
    assert (
        str(caught.value)
        == "image path /var/lib/dpkg/status: expected a regular file, found a symlink"
    )


def test_hostile_copyright_files_are_never_read_from_the_host(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = tmp_path / "host-copyright"
    host.write_bytes(GPL_COPYRIGHT)  # what a host read would find
    names = ("a-link", "b-fifo", "c-huge", "d-fine")
    status = b"\n".join(NGINX_STATUS.replace(b"nginx", n.encode()) for n in names)
    layer = crafted_tar(
        *BASE_DIRS,
        _reg("var/lib/dpkg/status", status),
        *_dirs(*(f"usr/share/doc/{n}" for n in names)),
        ("usr/share/doc/a-link/copyright", tarfile.SYMTYPE, {"linkname": str(host)}),
        ("usr/share/doc/b-fifo/copyright", tarfile.FIFOTYPE, {}),
        _reg("usr/share/doc/c-huge/copyright", GPL_COPYRIGHT + b" " * 4096),
        _reg("usr/share/doc/d-fine/copyright", GPL_COPYRIGHT),
    )
    put_image(store, layer, ref="hsup-hostile:1")
    monkeypatch.setitem(inventory.LIMITS, "copyright", 2048)
    warnings: list[str] = []
    monkeypatch.setattr("sysbake.supply.inventory.log.warn", warnings.append)
    inv = inventory.inventory(store, "hsup-hostile:1")
    assert {p.name: p.licence for p in inv.packages} == {
        "a-link": None,  # resolved inside the image, where it leads nowhere
        "b-fifo": None,
        "c-huge": None,
        "d-fine": Licence("GPL-2.0-or-later"),
    }
    assert warnings == [
        "licences of 2 packages not read: image path /usr/share/doc/b-fifo/copyright: "
        "expected a regular file, found a FIFO (and 1 more)"
    ]


def test_a_status_file_over_the_cap_is_one_line(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = crafted_tar(*BASE_DIRS, _reg("var/lib/dpkg/status", NGINX_STATUS * 50))
    put_image(store, layer, ref="hsup-big:1")
    monkeypatch.setitem(inventory.LIMITS, "status", 1024)
    with pytest.raises(
        SupplyError, match=r"^image path /var/lib/dpkg/status: \d+ bytes, more than the 1024 read"
    ):
        inventory.inventory(store, "hsup-big:1")


def test_brought_by_is_the_topmost_layer_that_made_the_final_version() -> None:
    a1, a2 = DebPackage("a", "1", "all", "a"), DebPackage("a", "2", "all", "a")
    b, c = DebPackage("b", "1", "all", "b"), DebPackage("c", "1", "all", "c")
    statuses = [[a1, b], [a2, b], [a2, b, c], [a1, b, c]]  # a downgraded back in layer 3
    assert inventory.brought_by(statuses) == {("a", "all"): 3, ("b", "all"): 0, ("c", "all"): 2}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts an overlay of the layers (root)")
def test_each_package_names_the_layer_and_stage_that_brought_it(store: Store) -> None:
    other = NGINX_STATUS.replace(b"nginx", b"curl")
    base = crafted_tar(*BASE_DIRS, _reg("var/lib/dpkg/status", NGINX_STATUS))
    step = crafted_tar(
        *_dirs("var", "var/lib", "var/lib/dpkg"),
        _reg("var/lib/dpkg/status", NGINX_STATUS + b"\n" + other),
        *_dirs("usr", "usr/local", "usr/local/lib", "usr/local/lib/python3.11"),
        *_dirs(
            "usr/local/lib/python3.11/dist-packages",
            "usr/local/lib/python3.11/dist-packages/demo-1.0.dist-info",
        ),
        _reg(
            "usr/local/lib/python3.11/dist-packages/demo-1.0.dist-info/METADATA",
            b"Name: Demo\nVersion: 1.0\nLicense-Expression: MIT\n",
        ),
    )
    untouched = crafted_tar(*_dirs("etc"), _reg("etc/motd", b"hi\n"))
    history = [
        {"created": "2024-01-01T00:00:00Z", "comment": "sysbake bootstrap 0123456789abcdef"},
        {"created": "2024-01-01T00:00:00Z", "comment": "sysbake system 0123456789abcdef"},
        {"created": "2024-01-01T00:00:00Z", "empty_layer": True},
        {"created": "2024-01-01T00:00:00Z", "comment": "sysbake motd 0123456789abcdef"},
    ]
    put_image(store, base, step, untouched, ref="hsup-layers:1", history=history)
    inv = inventory.inventory(store, "hsup-layers:1")
    assert [(p.kind, p.name, p.layer) for p in inv.packages] == [
        ("deb", "curl", 1),
        ("deb", "nginx", 0),
        ("python", "demo", 1),
    ]
    assert [la.stage for la in inv.layers] == ["bootstrap", "system", "motd"]
    assert inv.packages[2].licence == Licence("MIT")
    assert inv.packages[2].location == "/usr/local/lib/python3.11/dist-packages/demo-1.0.dist-info"
    assert not any("sbom" in p.name for p in (store.tmp_dir).iterdir())  # staging removed


def test_the_cli_says_a_hostile_status_file_in_one_line(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sysbake import cli

    host = tmp_path / "host-status"
    host.write_bytes(NGINX_STATUS)
    layer = crafted_tar(
        *BASE_DIRS, ("var/lib/dpkg/status", tarfile.SYMTYPE, {"linkname": str(host)})
    )
    put_image(store, layer, ref="hsup-cli:1")
    code = cli.main(["--store", str(store.root), "sbom", "hsup-cli:1"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    line = "image path /var/lib/dpkg/status: expected a regular file, found a symlink"
    assert err == f"sysbake: error: {line}\n"
    assert host.read_bytes() == NGINX_STATUS
