"""Image references: the one grammar that the store, the project file and the registry
client share (after the distribution reference grammar of docker and podman)::

    reference  := name [":" tag] ["@" digest]
    name       := [domain "/"] path            at most 255 characters
    domain     := host [":" port]              DNS labels joined by ".", or "[" IPv6 "]"
    path       := component ("/" component)*
    component  := [a-z0-9]+ (("." | "_" | "__" | "-"+) [a-z0-9]+)*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex digits (the one algorithm the store keeps)

The first component is the domain when it holds a "." or a ":" or is "localhost", as docker
and podman decide. Upper case is allowed in the domain only, which is kept in lower case
(host names ignore case). A name without a domain is a local short name of the store
(`web`, `team/web`), never expanded to a default registry. Without a tag or a digest the
tag is `latest`. No component can be empty, "." or "..": names become paths and URLs.

This module imports only `re`, typing and the error root: the run path loads it with the
store.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sysbake.errors import SysbakeError

MAX_NAME = 255
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # a DNS label
_IPV6 = re.compile(r"\[[0-9A-Fa-f:]+\]")
_PORT = re.compile(r"[0-9]{1,5}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

_EXPECTED_HOST = (
    "expected HOST[:PORT]: DNS labels of letters, digits and inner '-' joined "
    "by '.', or an [IPv6] address; a port from 1 to 65535"
)


class InvalidReference(SysbakeError):
    """`text` is not an image reference; `problem` says what is wrong and what was
    expected (the message is both, after the text)."""

    exit_code = 2  # the user's input, as a usage error

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"{text!r}: {problem}")
        self.text = text
        self.problem = problem


class Reference(NamedTuple):
    """A parsed image reference (see the module docstring), normalized: domain in lower case,
    tag `latest` unless a tag or digest was given."""

    domain: str  # "host[:port]" in lower case; "" for a local short name
    path: str  # the repository: components joined by "/"
    tag: str | None  # None only when pinned by a digest alone
    digest: str | None

    @classmethod
    def parse(
        cls, text: str, *, need_registry: bool = False, allow_digest: bool = True
    ) -> Reference:
        """`text` as a reference, or InvalidReference saying what was expected.
        `need_registry`: the name must start with a registry host (pull, push).
        `allow_digest=False`: a name to tag an image as, so no '@digest'."""
        rest, at, digest = text.partition("@")
        name, colon, tag = rest.rpartition(":")
        if not colon or "/" in tag:  # a ':' before the last '/' is a port
            name, colon, tag = rest, "", ""
        problem = (
            _name_problem(name)
            or _tag_problem(tag if colon else None)
            or _digest_problem(digest if at else None, allow_digest)
        )
        if problem:
            raise InvalidReference(text, problem)
        domain, _, path = name.partition("/") if _has_domain(name) else ("", "", name)
        if need_registry and not domain:
            raise InvalidReference(
                text, "names no registry: expected HOST[:PORT]/repository[:tag][@digest]"
            )
        return cls(domain.lower(), path, tag or (None if at else "latest"), digest or None)

    @property
    def name(self) -> str:
        """`domain/path`, or `path` for a local short name."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def reference(self) -> str:
        """What a registry's /v2/<path>/manifests/ takes: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def store_name(self) -> str:
        """The store's tag for this image, `name:tag`; `name:sha256-<hex>` when pinned by a
        digest alone (the cosign convention: a store tag cannot hold '@')."""
        return f"{self.name}:{self.tag or (self.digest or '').replace(':', '-')}"

    def __str__(self) -> str:
        """The normalized text, which parses back to the same value."""
        tag = f":{self.tag}" if self.tag else ""
        return f"{self.name}{tag}" + (f"@{self.digest}" if self.digest else "")


def parse_domain(text: str) -> str:
    """A registry's `host[:port]` alone (as `sysbake login` takes it), in lower case;
    InvalidReference when it is not the domain of a reference."""
    problem = _domain_problem(text)
    if problem:
        raise InvalidReference(text, problem)
    return text.lower()


def _has_domain(name: str) -> bool:
    first, slash, _ = name.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def _name_problem(name: str) -> str | None:
    """What is wrong with `name` (domain and path), or None."""
    parts = name.split("/")
    for part in parts:
        if part in ("", ".") or ".." in part:
            if not name:
                return "no name: expected name[:tag][@digest]"
            return (
                f"the image name has a path component {part!r}: '..', '.' and empty "
                "components are not allowed"
            )
    if _has_domain(name):
        problem = _domain_problem(parts[0])
        if problem:
            return problem
        parts = parts[1:]
    for part in parts:
        if not _COMPONENT.fullmatch(part):
            hint = (
                " (upper case is allowed only in the registry host)"
                if _COMPONENT.fullmatch(part.lower())
                else ""
            )
            return (
                f"invalid path component {part!r}{hint}: expected lowercase letters and "
                "digits, joined by '.', '_', '__' or '-'"
            )
    if len(name) > MAX_NAME:
        return f"the name is {len(name)} characters long: expected at most {MAX_NAME}"
    return None


def _domain_problem(domain: str) -> str | None:
    """What is wrong with a `host[:port]`, or None."""
    if domain.startswith("["):
        end = domain.find("]") + 1
        host, port = domain[:end], domain[end:]
        valid = bool(_IPV6.fullmatch(host))
    else:
        host, colon, digits = domain.partition(":")
        port = colon + digits
        valid = all(_LABEL.fullmatch(label) for label in host.split("."))
    if port:
        digits = port[1:]
        valid = (
            valid and port[0] == ":" and bool(_PORT.fullmatch(digits)) and 0 < int(digits) < 65536
        )
    return None if valid else f"invalid registry host {domain!r}: {_EXPECTED_HOST}"


def _tag_problem(tag: str | None) -> str | None:
    if tag is None or _TAG.fullmatch(tag):
        return None
    return (
        f"invalid tag {tag!r}: expected 1 to 128 letters, digits, '_', '.' or '-', "
        "not starting with '.' or '-'"
    )


def _digest_problem(digest: str | None, allowed: bool) -> str | None:
    if digest is None:
        return None
    if not _DIGEST.fullmatch(digest):
        return f"invalid digest {digest!r}: expected sha256: and 64 lowercase hex digits"
    if not allowed:
        return "has a digest: expected name[:tag] (an image is tagged by name, not by digest)"
    return None
