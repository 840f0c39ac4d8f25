"""Registry credentials: `WWW-Authenticate` challenges, auth.json files, credential helpers.

auth.json is podman's and docker's format, ``{"auths": {"host:port": {"auth":
base64("user:pass")}}}``. `sysbake login` writes podman's default file: $REGISTRY_AUTH_FILE,
else ``$XDG_RUNTIME_DIR/containers/auth.json``, else ``/run/containers/<uid>/auth.json``.
Credentials are read from that file, then ``$XDG_CONFIG_HOME/containers/auth.json`` and
docker's ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``); an explicit
file (--authfile or $REGISTRY_AUTH_FILE) is the only one read.

Credential helpers, as docker and podman use them: in each file, in this order, the helper
``credHelpers`` names for the registry's host, the file's own ``auths`` entry, then the
default helper ``credsStore``; the first that knows the registry wins, and the next file is
read only when none did. A helper is the program ``docker-credential-NAME`` on $PATH, run
as ``docker-credential-NAME get`` with the registry ("host[:port]") on its stdin; it
prints ``{"ServerURL", "Username", "Secret"}``, or says "credentials not found". A
Username of ``<token>`` makes the Secret an identity token (exchanged for access tokens,
sysbake.registry.client). A helper that credHelpers names but that is not installed is an
error; a missing credsStore helper is a warning (docker's configs often name one).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sysbake import log
from sysbake.errors import SysbakeError
from sysbake.fsutil import atomic_write
from sysbake.records import record

HELPER_PREFIX = "docker-credential-"
HELPER_TIMEOUT = 60.0  # seconds: a helper may ask a keyring that asks the user
IDENTITY_TOKEN_USER = "<token>"
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class RegistryError(SysbakeError):
    """Talking to a registry failed: refused, dropped, denied, not found or lied to."""


@record
class Credentials:
    """A user name and password (or token) for one registry."""

    username: str
    password: str

    @property
    def identity_token(self) -> bool:
        """Whether the password is an identity token (a helper's "<token>" user)."""
        return self.username == IDENTITY_TOKEN_USER

    def basic(self) -> str:
        """The value of an `Authorization: Basic` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def parse_creds(text: str) -> tuple[str, str | None]:
    """'user:pass' -> ('user', 'pass'); 'user' -> ('user', None) (ask for the password)."""
    user, sep, password = text.partition(":")
    if not user:
        raise RegistryError(f"--creds {text!r}: expected USER[:PASSWORD]")
    return user, (password if sep else None)


# -- WWW-Authenticate ---------------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
# Unquoted values are tokens in RFC 7235; registries' realms are URLs, so be lenient.
_PARAM_RE = re.compile(rf"[\s,]*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^\s,\"]+))")


@record
class Challenge:
    """One authentication challenge: a scheme ('basic', 'bearer') and its parameters."""

    scheme: str
    params: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        return dict(self.params).get(key)


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge of a `WWW-Authenticate` value (RFC 7235: several may share a line)."""
    out: list[Challenge] = []
    pos = 0
    while True:
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            return out
        pos = m.end()
        params: list[tuple[str, str]] = []
        while (p := _PARAM_RE.match(header, pos)) is not None:
            value = p[2] if p[2] is not None else p[3]
            params.append((p[1].lower(), re.sub(r"\\(.)", r"\1", value)))
            pos = p.end()
        rest = header[pos:].lstrip()
        if rest and not rest.startswith(","):
            # A token68 (`Basic abc==`): not used by registries; skip to the next comma.
            nxt = header.find(",", pos)
            pos = len(header) if nxt < 0 else nxt
        out.append(Challenge(m[1].lower(), tuple(params)))


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer when offered (it scopes access), else Basic."""
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return None


# -- auth.json ---------------------------------------------------------------------------------


def explicit_auth_file(env: Mapping[str, str] | None = None) -> Path | None:
    value = (os.environ if env is None else env).get("REGISTRY_AUTH_FILE", "")
    return Path(value) if value else None


def default_auth_file(env: Mapping[str, str] | None = None) -> Path:
    """Where `login` writes: podman's convention (see the module docstring)."""
    env = os.environ if env is None else env
    explicit = explicit_auth_file(env)
    if explicit is not None:
        return explicit
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime:
        return Path(runtime) / "containers" / "auth.json"
    from sysbake.userns import login_uid  # rootless: the user's, not the namespace's 0

    return Path(f"/run/containers/{login_uid()}/auth.json")


def auth_files(auth_file: Path | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """The files credentials are looked up in, first match wins."""
    env = os.environ if env is None else env
    explicit = auth_file or explicit_auth_file(env)
    if explicit is not None:
        return [explicit]
    home = Path(env.get("HOME") or Path.home())
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    docker = Path(env.get("DOCKER_CONFIG") or home / ".docker")
    return [
        default_auth_file(env),
        config_home / "containers" / "auth.json",
        docker / "config.json",
    ]


def normalize_key(key: str) -> str:
    """An auths key as 'host[:port][/path]': docker writes 'https://host/v1/' style keys."""
    key = re.sub(r"^[a-z]+://", "", key.strip())
    key = re.sub(r"/v[12]/?$", "", key)
    return key.rstrip("/")


def decode_entry(entry: Any, where: str) -> Credentials | None:
    """Credentials of one auths entry: its base64 "auth", or "username"/"password"; None
    for an entry without either (docker's credential helpers keep them elsewhere)."""
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: expected an object with an 'auth' key")
    if entry.get("auth"):
        try:
            raw = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise RegistryError(f"{where}: 'auth' is not base64 of USER:PASSWORD") from exc
        user, sep, password = raw.partition(":")
        if not sep:
            raise RegistryError(f"{where}: 'auth' is not base64 of USER:PASSWORD")
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password", "")))
    log.debug(f"{where}: no credentials in the entry (a credential helper may have them)")
    return None


def lookup_credentials(registry: str, repository: str, files: list[Path]) -> Credentials | None:
    """Credentials for `registry`/`repository` from `files`, in order (see the module
    docstring for helpers); within a file's auths the most specific key wins
    ('host/ns/repo' over 'host/ns' over 'host')."""
    for path in files:
        doc = _read_doc(path)
        helper, key = _cred_helper(doc, registry, path)
        if helper:
            creds = helper_credentials(helper, registry, f"{path}: credHelpers.{key}")
            if creds is not None:
                return creds
        creds = _inline_credentials(doc, registry, repository, path)
        if creds is not None:
            return creds
        store = doc.get("credsStore")
        if store is not None and not isinstance(store, str):
            raise RegistryError(f"{path}: key 'credsStore' must be a string")
        if store:
            creds = helper_credentials(store, registry, f"{path}: credsStore", required=False)
            if creds is not None:
                return creds
    return None


def _cred_helper(doc: dict[str, Any], registry: str, path: Path) -> tuple[str, str]:
    """The helper a file's credHelpers names for `registry`, and its key ("" when none)."""
    helpers = doc.get("credHelpers", {})
    if not isinstance(helpers, dict):
        raise RegistryError(f"{path}: key 'credHelpers' must be an object")
    for key, helper in helpers.items():
        if normalize_key(str(key)) == registry:
            if not isinstance(helper, str):
                raise RegistryError(f"{path}: credHelpers.{key} must be a string")
            return helper, str(key)
    return "", ""


def _inline_credentials(
    doc: dict[str, Any], registry: str, repository: str, path: Path
) -> Credentials | None:
    auths = doc.get("auths")
    if auths is None:
        return None
    if not isinstance(auths, dict):
        raise RegistryError(f"{path}: key 'auths' must be an object")
    wanted = f"{registry}/{repository}"
    found: list[tuple[int, Credentials]] = []
    for key, entry in auths.items():
        norm = normalize_key(key)
        if norm == registry or wanted == norm or wanted.startswith(norm + "/"):
            creds = decode_entry(entry, f"{path}: auths.{key}")
            if creds is not None:
                found.append((len(norm), creds))
    return max(found, key=lambda item: item[0])[1] if found else None


def helper_credentials(
    helper: str, server: str, where: str, *, required: bool = True
) -> Credentials | None:
    """What `docker-credential-HELPER get` knows of `server`; None when it knows nothing
    (or, unless `required`, when the helper is not installed: a warning)."""
    from sysbake import proc
    from sysbake.errors import CommandError

    if not _HELPER_NAME.match(helper):
        raise RegistryError(f"{where}: {helper!r} is not a credential helper name")
    program = proc.which(HELPER_PREFIX + helper)
    if program is None:
        message = f"{where}: {HELPER_PREFIX}{helper} is not on $PATH"
        if required:
            raise RegistryError(f"{message}: install it, or remove the entry")
        log.warn(f"{message}: its credentials are not used")
        return None
    try:
        result = proc.run(
            [program, "get"],
            what=f"{HELPER_PREFIX}{helper}",
            input=server.encode(),
            check=False,
            timeout=HELPER_TIMEOUT,
        )
    except CommandError as exc:
        raise RegistryError(f"{where}: {exc}") from exc
    said = (result.stdout or b"").decode(errors="replace").strip()
    if result.returncode != 0:
        if "credentials not found" in said.lower():
            return None  # docker's helpers' own wording for "not stored here"
        raise RegistryError(
            f"{where}: {HELPER_PREFIX}{helper} get failed (exit {result.returncode}): "
            f"{proc.tail_of(result, lines=1)}"
        )
    return _helper_answer(said, f"{where}: {HELPER_PREFIX}{helper} get")


def _helper_answer(text: str, where: str) -> Credentials | None:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: expected a JSON object with Username and Secret")
    secret, user = doc.get("Secret"), doc.get("Username")
    if not isinstance(secret, str) or not isinstance(user, str | None):
        raise RegistryError(f"{where}: expected a JSON object with Username and Secret")
    return Credentials(user or "", secret) if secret else None


def _write_private(path: Path, doc: dict[str, Any]) -> None:
    # Mode 0600 and a 0700 directory: these files hold passwords.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(doc, indent="\t") + "\n").encode(), mode=0o600)


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: not a readable auth.json ({exc})") from exc
    if not isinstance(doc, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return doc


def save_credentials(path: Path, registry: str, creds: Credentials) -> None:
    """Store `creds` for `registry` in `path`, keeping every other key (mode 0600)."""
    doc = _read_doc(path)
    auths = doc.setdefault("auths", {})
    for key in [k for k in auths if normalize_key(k) == registry]:
        del auths[key]
    token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    auths[registry] = {"auth": token}
    _write_private(path, doc)


def remove_credentials(path: Path, registry: str | None) -> bool:
    """Forget `registry` (None: every registry) in `path`; whether anything was removed."""
    doc = _read_doc(path)
    auths = doc.get("auths") or {}
    gone = [k for k in auths if registry is None or normalize_key(k) == registry]
    if not gone:
        return False
    for key in gone:
        del auths[key]
    doc["auths"] = auths
    _write_private(path, doc)
    return True
