"""Licence names as SPDX licence expressions.

Debian's copyright files (DEP-5) name licences by Debian's short names ("GPL-2+", "Expat",
"BSD-3-clause"), Python distributions by an SPDX `License-Expression`, trove classifiers or
free text. An expression here uses only SPDX identifiers this module knows (so that every
SPDX and CycloneDX validator accepts it) and `LicenseRef-<name>` for any other name, which
an SBOM must declare (`Licence.refs`). Nothing is guessed: a name not in the tables stays
a LicenseRef, a synopsis this module cannot read ("GPL-2+ with OpenSSL exception") becomes
one LicenseRef of the whole, and a Python distribution that says nothing usable has none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sysbake.records import record

# Debian short names (lower case) -> SPDX identifiers.
DEBIAN_NAMES = {
    "gpl-1": "GPL-1.0-only",
    "gpl-1+": "GPL-1.0-or-later",
    "gpl-2": "GPL-2.0-only",
    "gpl-2+": "GPL-2.0-or-later",
    "gpl-2.0": "GPL-2.0-only",
    "gpl-2.0+": "GPL-2.0-or-later",
    "gpl-3": "GPL-3.0-only",
    "gpl-3+": "GPL-3.0-or-later",
    "gpl-3.0": "GPL-3.0-only",
    "gpl-3.0+": "GPL-3.0-or-later",
    "lgpl-2": "LGPL-2.0-only",
    "lgpl-2+": "LGPL-2.0-or-later",
    "lgpl-2.0": "LGPL-2.0-only",
    "lgpl-2.0+": "LGPL-2.0-or-later",
    "lgpl-2.1": "LGPL-2.1-only",
    "lgpl-2.1+": "LGPL-2.1-or-later",
    "lgpl-3": "LGPL-3.0-only",
    "lgpl-3+": "LGPL-3.0-or-later",
    "lgpl-3.0": "LGPL-3.0-only",
    "lgpl-3.0+": "LGPL-3.0-or-later",
    "agpl-3": "AGPL-3.0-only",
    "agpl-3+": "AGPL-3.0-or-later",
    "gfdl-1.2": "GFDL-1.2-only",
    "gfdl-1.2+": "GFDL-1.2-or-later",
    "gfdl-1.3": "GFDL-1.3-only",
    "gfdl-1.3+": "GFDL-1.3-or-later",
    "expat": "MIT",
    "mit": "MIT",
    "x11": "X11",
    "isc": "ISC",
    "0bsd": "0BSD",
    "bsd-2-clause": "BSD-2-Clause",
    "bsd-3-clause": "BSD-3-Clause",
    "bsd-4-clause": "BSD-4-Clause",
    "apache-1.1": "Apache-1.1",
    "apache-2": "Apache-2.0",
    "apache-2.0": "Apache-2.0",
    "artistic": "Artistic-1.0-Perl",  # Debian's common-licenses/Artistic is Perl's
    "artistic-1.0": "Artistic-1.0",
    "artistic-2.0": "Artistic-2.0",
    "zlib": "Zlib",
    "mpl-1.1": "MPL-1.1",
    "mpl-2.0": "MPL-2.0",
    "epl-1.0": "EPL-1.0",
    "epl-2.0": "EPL-2.0",
    "cddl-1.0": "CDDL-1.0",
    "cc0": "CC0-1.0",
    "cc0-1.0": "CC0-1.0",
    "cc-by-3.0": "CC-BY-3.0",
    "cc-by-4.0": "CC-BY-4.0",
    "cc-by-sa-3.0": "CC-BY-SA-3.0",
    "cc-by-sa-4.0": "CC-BY-SA-4.0",
    "psf-2": "PSF-2.0",
    "psf-2.0": "PSF-2.0",
    "python-2.0": "Python-2.0",
    "openssl": "OpenSSL",
    "bsl-1.0": "BSL-1.0",
    "boost-1.0": "BSL-1.0",
    "curl": "curl",
    "unicode-dfs-2016": "Unicode-DFS-2016",
    "ftl": "FTL",
    "ofl-1.1": "OFL-1.1",
    "sil-ofl-1.1": "OFL-1.1",
    "wtfpl": "WTFPL",
    "unlicense": "Unlicense",
    "zpl-2.1": "ZPL-2.1",
    "ruby": "Ruby",
    "php-3.01": "PHP-3.01",
    "sleepycat": "Sleepycat",
    "bzip2-1.0.6": "bzip2-1.0.6",
    "libpng": "Libpng",
    "libpng-2.0": "libpng-2.0",
    "ijg": "IJG",
    "tcl": "TCL",
    "bsd-4-clause-uc": "BSD-4-Clause-UC",
    "latex2e": "Latex2e",
    "afl-2.1": "AFL-2.1",
    "ms-pl": "MS-PL",
    "beerware": "Beerware",
    "fsfap": "FSFAP",
    "fsfullr": "FSFULLR",
}
# Every identifier above, by its lower-case spelling (an SPDX identifier written as such).
SPDX_IDS = {spdx.lower(): spdx for spdx in DEBIAN_NAMES.values()}
# Trove classifiers that name one licence unambiguously.
CLASSIFIERS = {
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: ISC License (ISCL)": "ISC",
    "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "License :: OSI Approved :: Python Software Foundation License": "PSF-2.0",
    "License :: OSI Approved :: GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)": (
        "GPL-2.0-or-later"
    ),
    "License :: OSI Approved :: GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)": (
        "GPL-3.0-or-later"
    ),
    "License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "License :: OSI Approved :: GNU Lesser General Public License v3 or later (LGPLv3+)": (
        "LGPL-3.0-or-later"
    ),
    "License :: OSI Approved :: The Unlicense (Unlicense)": "Unlicense",
    "License :: CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
}
_OPERATORS = {"and": "AND", "or": "OR"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]*")
_EXPRESSION_TOKEN = re.compile(r"\(|\)|[^\s()]+")


@record
class Licence:
    """An SPDX licence expression and the LicenseRef identifiers in it (each with the name
    it stands for), which an SBOM declares."""

    expression: str
    refs: tuple[tuple[str, str], ...] = ()


def licence_ref(name: str) -> str:
    """`LicenseRef-<name>` with every character SPDX does not allow there as '-'."""
    return "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.-]", "-", name).strip("-") or "unnamed")


def _spdx_id(name: str) -> str | None:
    key = name.lower()
    return DEBIAN_NAMES.get(key) or SPDX_IDS.get(key)


def _term(name: str, refs: dict[str, str]) -> str:
    known = _spdx_id(name)
    if known is not None:
        return known
    ref = licence_ref(name)
    refs[ref] = name
    return ref


def _synopsis(text: str, refs: dict[str, str]) -> str:
    """One DEP-5 synopsis as an SPDX expression: names joined by `and`/`or`, commas
    grouping what they separate ("A or B, and C" is "(A OR B) AND C"); anything else
    (`with` exceptions, parentheses) as one LicenseRef of the whole synopsis."""
    groups: list[tuple[str, str]] = []  # (operator joining it to the previous, expression)
    for number, part in enumerate(text.split(",")):
        words = part.split()
        joiner = "AND"
        if number and words and words[0].lower() in _OPERATORS:
            joiner = _OPERATORS[words.pop(0).lower()]
        names, ops = words[0::2], words[1::2]
        readable = (
            bool(words)
            and len(words) % 2 == 1
            and all(_NAME.fullmatch(n) and n.lower() not in ("with", "and", "or") for n in names)
            and all(op.lower() in _OPERATORS for op in ops)
        )
        if not readable:
            ref = licence_ref(text)
            refs[ref] = text
            return ref
        expression = _term(names[0], refs)
        for op, name in zip(ops, names[1:], strict=True):
            expression += f" {_OPERATORS[op.lower()]} {_term(name, refs)}"
        groups.append((joiner, expression))
    if len(groups) == 1:
        return groups[0][1]
    out = ""
    for joiner, expression in groups:
        item = f"({expression})" if " " in expression else expression
        out = f"{out} {joiner} {item}" if out else item
    return out


def debian_licence(synopses: Sequence[str]) -> Licence | None:
    """The licence of a Debian package from its copyright file's synopses (see
    sysbake.supply.packages.dep5_licences): each as an expression, several joined by AND
    (each paragraph covers some of its files); None when there are none."""
    refs: dict[str, str] = {}
    parts = list(dict.fromkeys(_synopsis(s, refs) for s in synopses if s.strip()))
    if not parts:
        return None
    if len(parts) == 1:
        return Licence(parts[0], tuple(sorted(refs.items())))
    joined = " AND ".join(f"({p})" if " " in p else p for p in parts)
    return Licence(joined, tuple(sorted(refs.items())))


def _known_expression(text: str) -> str | None:
    """`text` when it is an SPDX expression of known identifiers, AND, OR and parentheses
    (normalised spelling), else None."""
    out = []
    depth = 0
    for token in _EXPRESSION_TOKEN.findall(text):
        if token in "()":
            depth += 1 if token == "(" else -1
            if depth < 0:
                return None
            out.append(token)
        elif token.upper() in ("AND", "OR"):
            out.append(token.upper())
        elif (known := SPDX_IDS.get(token.lower())) is not None:
            out.append(known)
        else:
            return None
    if depth or not out:
        return None
    return " ".join(out).replace("( ", "(").replace(" )", ")")


def python_licence(
    expression: str, license_text: str, classifiers: Sequence[str]
) -> Licence | None:
    """The licence of a Python distribution: its License-Expression when made of known
    identifiers, else its classifiers that name one licence (several: a choice, OR), else
    a short License field that is a known name; None otherwise."""
    known = _known_expression(expression) if expression else None
    if known:
        return Licence(known)
    named = sorted({CLASSIFIERS[c] for c in classifiers if c in CLASSIFIERS})
    if named:
        return Licence(" OR ".join(named))
    short = license_text.strip()
    if short and "\n" not in short and len(short) <= 40:
        known = _spdx_id(short) or _known_expression(short)
        if known:
            return Licence(known)
    return None
