"""An inventory (sysbake.supply.inventory) as an SBOM document: SPDX 2.3 JSON or
CycloneDX 1.5 JSON.

Deterministic: the same image gives the same bytes. The timestamp is the image's
`created`, identifiers derive from the manifest digest, packages are sorted (Debian by
name and architecture, then Python by name, version and location) and keys are sorted.
Each package says which layer brought it and the stage that made that layer: SPDX in the
package's comment, CycloneDX in `sysbake:*` properties.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sysbake import __version__
from sysbake.supply.inventory import Inventory, Package

FORMATS = ("spdx-json", "cyclonedx-json")
MEDIA_TYPES = {
    "spdx-json": "application/spdx+json",
    "cyclonedx-json": "application/vnd.cyclonedx+json",
}
_TOOL = f"sysbake-{__version__}"
_NONE = "NOASSERTION"
_EPOCH = "1970-01-01T00:00:00Z"


def timestamp(created: str) -> str:
    """`created` (RFC 3339, any offset or precision) as UTC to the second, as SPDX wants."""
    try:
        when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _image_purl(inv: Inventory) -> str:
    """pkg:oci/<last name component>@<manifest digest>[?arch=...], as the purl spec's oci
    type has it."""
    name = inv.name.split("@")[0].rsplit("/", 1)[-1].split(":")[0] or "image"
    arch = f"?arch={inv.architecture}" if inv.architecture else ""
    return f"pkg:oci/{name}@{inv.manifest.replace(':', '%3A')}{arch}"


def _where(inv: Inventory, pkg: Package) -> str:
    layer = inv.layers[pkg.layer] if pkg.layer < len(inv.layers) else None
    text = f"layer {pkg.layer}"
    if layer is not None:
        text += f" ({layer.diff_id}), stage {layer.stage}"
    return text


def _uuid(inv: Inventory, kind: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sysbake:{kind}:{inv.name}:{inv.manifest}"))


# -- SPDX 2.3 -----------------------------------------------------------------------------------


def _spdx_id(text: str, taken: set[str]) -> str:
    """A unique SPDXRef- identifier from `text` (only letters, digits, '.' and '-')."""
    base = "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")
    ident, n = base, 1
    while ident in taken:
        n += 1
        ident = f"{base}-{n}"
    taken.add(ident)
    return ident


def _spdx_package(inv: Inventory, pkg: Package, ident: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "SPDXID": ident,
        "name": pkg.name,
        "versionInfo": pkg.version,
        "downloadLocation": _NONE,
        "filesAnalyzed": False,
        "licenseConcluded": _NONE,
        "licenseDeclared": pkg.licence.expression if pkg.licence else _NONE,
        "copyrightText": _NONE,
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": pkg.purl,
            }
        ],
        "comment": f"brought by {_where(inv, pkg)}"
        + (f"; installed at {pkg.location}" if pkg.location else ""),
    }
    if pkg.kind == "deb":
        doc["sourceInfo"] = (
            f"built from source package {pkg.source} {pkg.source_version or pkg.version}"
        )
    return doc


def spdx(inv: Inventory) -> dict[str, Any]:
    """The inventory as an SPDX 2.3 document (a JSON value)."""
    taken: set[str] = {"SPDXRef-DOCUMENT", "SPDXRef-image"}
    image: dict[str, Any] = {
        "SPDXID": "SPDXRef-image",
        "name": inv.name,
        "versionInfo": inv.manifest,
        "downloadLocation": _NONE,
        "filesAnalyzed": False,
        "licenseConcluded": _NONE,
        "licenseDeclared": _NONE,
        "copyrightText": _NONE,
        "primaryPackagePurpose": "CONTAINER",
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": _image_purl(inv),
            }
        ],
        "comment": f"image ID {inv.image_id}; layers: "
        + ", ".join(f"{la.index} {la.diff_id} ({la.stage})" for la in inv.layers),
    }
    packages = [image]
    relationships = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": "SPDXRef-image",
        }
    ]
    refs: dict[str, str] = {}
    for pkg in inv.packages:
        ident = _spdx_id(f"{pkg.kind}-{pkg.name}-{pkg.architecture or pkg.version}", taken)
        packages.append(_spdx_package(inv, pkg, ident))
        relationships.append(
            {
                "spdxElementId": "SPDXRef-image",
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": ident,
            }
        )
        if pkg.licence is not None:
            refs.update(pkg.licence.refs)
    doc: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"sysbake SBOM of {inv.name}",
        "documentNamespace": f"urn:uuid:{_uuid(inv, 'spdx')}",
        "creationInfo": {"created": timestamp(inv.created), "creators": [f"Tool: {_TOOL}"]},
        "packages": packages,
        "relationships": relationships,
    }
    if refs:
        doc["hasExtractedLicensingInfos"] = [
            {
                "licenseId": ref,
                "name": name,
                "extractedText": f"The licence named {name!r} in Debian copyright files "
                "(see /usr/share/doc/<package>/copyright in the image).",
            }
            for ref, name in sorted(refs.items())
        ]
    return doc


# -- CycloneDX 1.5 ------------------------------------------------------------------------------


def _cdx_licences(pkg: Package) -> list[dict[str, Any]]:
    if pkg.licence is None:
        return []
    expression = pkg.licence.expression
    if " " not in expression and not expression.startswith("LicenseRef-"):
        return [{"license": {"id": expression}}]
    return [{"expression": expression}]


def _cdx_component(inv: Inventory, pkg: Package, ref: str) -> dict[str, Any]:
    layer = inv.layers[pkg.layer] if pkg.layer < len(inv.layers) else None
    props = {"sysbake:layer-index": str(pkg.layer)}
    if layer is not None:
        props |= {"sysbake:layer": layer.diff_id, "sysbake:stage": layer.stage}
    if pkg.kind == "deb":
        props |= {
            "sysbake:deb:architecture": pkg.architecture,
            "sysbake:deb:source": pkg.source,
            "sysbake:deb:source-version": pkg.source_version or pkg.version,
        }
    else:
        props["sysbake:location"] = pkg.location
    component: dict[str, Any] = {
        "type": "library",
        "bom-ref": ref,
        "name": pkg.name,
        "version": pkg.version,
        "purl": pkg.purl,
        "properties": [{"name": k, "value": v} for k, v in sorted(props.items())],
    }
    licences = _cdx_licences(pkg)
    if licences:
        component["licenses"] = licences
    return component


def cyclonedx(inv: Inventory) -> dict[str, Any]:
    """The inventory as a CycloneDX 1.5 BOM (a JSON value)."""
    refs: list[str] = []
    components = []
    for pkg in inv.packages:
        ref = pkg.purl if pkg.kind == "deb" else f"{pkg.purl}#{pkg.location}"
        while ref in refs:
            ref += "+"
        refs.append(ref)
        components.append(_cdx_component(inv, pkg, ref))
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{_uuid(inv, 'cyclonedx')}",
        "version": 1,
        "metadata": {
            "timestamp": timestamp(inv.created),
            "tools": {
                "components": [{"type": "application", "name": "sysbake", "version": __version__}]
            },
            "component": {
                "type": "container",
                "bom-ref": "image",
                "name": inv.name,
                "version": inv.manifest,
                "purl": _image_purl(inv),
                "properties": [
                    {"name": "sysbake:image-id", "value": inv.image_id},
                    *(
                        {"name": f"sysbake:layer:{la.index}", "value": f"{la.diff_id} {la.stage}"}
                        for la in inv.layers
                    ),
                ],
            },
        },
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": refs}]
        + [{"ref": ref, "dependsOn": []} for ref in refs],
    }


RENDER: dict[str, Callable[[Inventory], dict[str, Any]]] = {
    "spdx-json": spdx,
    "cyclonedx-json": cyclonedx,
}


def render(inv: Inventory, fmt: str) -> bytes:
    """The SBOM of `inv` in format `fmt` (one of FORMATS) as JSON bytes, deterministic."""
    return (
        json.dumps(RENDER[fmt](inv), indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    )
