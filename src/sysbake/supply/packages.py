"""Package databases of an image, parsed: dpkg's status file, Debian's machine-readable
(DEP-5) copyright files, Python distributions' METADATA, os-release, and package URLs.

Pure functions of bytes: sysbake.supply.inventory reads the files (through
sysbake.rootfs.Root, size-capped) and hands them here. Text is decoded as UTF-8 with
undecodable bytes replaced: an image's files are whatever their writer put there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from sysbake.records import record
from sysbake.supply import SupplyError

# Characters a purl keeps as they are in a version or qualifier value (the rest is
# percent-encoded: an epoch's ':' becomes %3A, a '+' %2B).
_PURL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_~")
_FIELD = re.compile(r"([!-9;-~][!-9;-~]*):[ \t]*(.*)")  # a field name is printable, no ':'
_SOURCE = re.compile(r"(\S+)(?:\s+\((\S+)\))?")
# The Format of a machine-readable copyright file names the 1.0 format (or the DEP-5
# draft it came from); the host it is published on does not matter here.
_DEP5_FORMATS = ("copyright-format/1.0", "deps/dep5")


@record
class DebPackage:
    """An installed Debian package as dpkg's status file lists it; `source` is its source
    package (its own name when the Source field is absent) and `source_version` that
    package's version when it differs from the binary's ("" when the same)."""

    name: str
    version: str
    architecture: str
    source: str
    source_version: str = ""


@record
class PyDist:
    """A Python distribution as its METADATA says: its name, version, the SPDX
    `License-Expression` it declares ("" when none), its free-text `License` field and its
    licence classifiers (`License :: ...`)."""

    name: str
    version: str
    license_expression: str = ""
    license_text: str = ""
    classifiers: tuple[str, ...] = ()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def paragraphs(
    text: str, where: str, *, strict: bool = True
) -> Iterator[tuple[int, dict[str, str]]]:
    """The paragraphs of a Debian control-style file (blank-line separated `Field: value`
    lines, continuation lines starting with a space or tab), each with the number of its
    first line; field names as written, a value's lines joined by newlines. `strict`: a
    line that is neither is a SupplyError naming `where` and the line (else skipped)."""
    fields: dict[str, str] = {}
    start = 0
    last: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if fields:
                yield start, fields
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is None:
                if strict:
                    raise SupplyError(f"{where}: line {number}: a continuation line with no field")
                continue
            fields[last] += "\n" + line.strip()
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            if strict:
                raise SupplyError(
                    f"{where}: line {number}: expected 'Field: value', got {line[:60]!r}"
                )
            last = None
            continue
        if not fields:
            start = number
        last = match[1]
        fields[last] = match[2].strip()
    if fields:
        yield start, fields


def _field(fields: dict[str, str], name: str) -> str:
    """A field by name, ignoring case (as dpkg does); "" when absent."""
    wanted = name.lower()
    for key, value in fields.items():
        if key.lower() == wanted:
            return value
    return ""


def parse_status(data: bytes, where: str) -> list[DebPackage]:
    """The installed packages of a dpkg status file (Status `... installed`), sorted by
    name and architecture; SupplyError naming `where` and the line of a paragraph that has
    no Package, or an installed one without a Version or Architecture."""
    found: dict[tuple[str, str], DebPackage] = {}
    for line, fields in paragraphs(_text(data), where):
        name = _field(fields, "Package")
        if not name:
            raise SupplyError(f"{where}: line {line}: a paragraph without a Package field")
        if _field(fields, "Status").split()[-1:] != ["installed"]:
            continue  # removed with its configuration kept, half-installed...
        version, arch = _field(fields, "Version"), _field(fields, "Architecture")
        if not version or not arch:
            missing = "Version" if not version else "Architecture"
            raise SupplyError(f"{where}: line {line}: installed package {name} has no {missing}")
        source, source_version = name, ""
        match = _SOURCE.fullmatch(_field(fields, "Source"))
        if match is not None:
            source = match[1]
            source_version = match[2] if match[2] and match[2] != version else ""
        found[(name, arch)] = DebPackage(name, version, arch, source, source_version)
    return [found[key] for key in sorted(found)]


def dep5_licences(data: bytes) -> tuple[str, ...] | None:
    """The licence synopses (the first line of each `License` field of the header and of
    the `Files` paragraphs, e.g. "GPL-2+" or "LGPL-2.1+ or Artistic"), distinct, in the
    order they first appear; None when the file is not in the machine-readable format."""
    found: dict[str, None] = {}
    first = True
    for _line, fields in paragraphs(_text(data), "copyright", strict=False):
        if first:
            first = False
            if not any(form in _field(fields, "Format") for form in _DEP5_FORMATS):
                return None
        elif not _field(fields, "Files"):
            continue  # a stand-alone licence paragraph: the text of a name used elsewhere
        synopsis = _field(fields, "License").split("\n", 1)[0].strip()
        if synopsis:
            found[synopsis] = None
    return None if first else tuple(found)


def parse_metadata(data: bytes, where: str) -> PyDist:
    """A Python distribution's METADATA (or PKG-INFO): its header fields up to the first
    blank line; SupplyError naming `where` when Name or Version is missing."""
    fields: dict[str, list[str]] = {}
    last: str | None = None
    for line in _text(data).splitlines():
        if not line.strip():
            break  # the description follows
        if line[0] in " \t" and last is not None:
            fields[last][-1] += "\n" + line.strip()
            continue
        key, colon, value = line.partition(":")
        if not colon:
            continue
        last = key.strip().lower()
        fields.setdefault(last, []).append(value.strip())
    name, version = (fields.get(k, [""])[0] for k in ("name", "version"))
    if not name or not version:
        raise SupplyError(f"{where}: expected Name and Version fields")
    classifiers = tuple(c for c in fields.get("classifier", []) if c.startswith("License ::"))
    return PyDist(
        name,
        version,
        fields.get("license-expression", [""])[0],
        fields.get("license", [""])[0],
        classifiers,
    )


def parse_os_release(data: bytes) -> dict[str, str]:
    """The variables of an os-release file (quotes removed)."""
    out: dict[str, str] = {}
    for line in _text(data).splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key and not key.startswith("#"):
            out[key] = value.strip().strip("\"'")
    return out


# -- package URLs -----------------------------------------------------------------------------


def _pct(text: str) -> str:
    return "".join(c if c in _PURL_SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _purl(kind: str, namespace: str, name: str, version: str, qualifiers: dict[str, str]) -> str:
    path = f"{_pct(namespace)}/{_pct(name)}" if namespace else _pct(name)
    query = "&".join(f"{k}={_pct(v)}" for k, v in sorted(qualifiers.items()) if v)
    return f"pkg:{kind}/{path}@{_pct(version)}" + (f"?{query}" if query else "")


def deb_purl(pkg: DebPackage, distro: str = "debian", distro_version: str = "") -> str:
    """pkg:deb/<distro>/<name>@<version>?arch=<arch>[&distro=<distro>-<version>]
    [&upstream=<source>], as the purl spec's deb type has it."""
    qualifiers = {"arch": pkg.architecture}
    if distro_version:
        qualifiers["distro"] = f"{distro}-{distro_version}"
    if pkg.source != pkg.name or pkg.source_version:
        qualifiers["upstream"] = pkg.source + (
            f"@{pkg.source_version}" if pkg.source_version else ""
        )
    return _purl("deb", distro.lower() or "debian", pkg.name, pkg.version, qualifiers)


def pypi_name(name: str) -> str:
    """A Python project name normalised as the purl spec's pypi type wants (PEP 503 less
    the dots: lower case, runs of '-', '_', '.' as one '-')."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pypi_purl(dist: PyDist) -> str:
    """pkg:pypi/<normalised name>@<version>."""
    return _purl("pypi", "", pypi_name(dist.name), dist.version, {})
