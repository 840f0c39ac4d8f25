"""Sigstore signatures: key pairs, the simple-signing payload, DSSE envelopes.

A key pair is what cosign and skopeo (`--sign-by-sigstore-private-key`) use: an ECDSA
P-256 key, the public half as a PEM `PUBLIC KEY` (what podman's `sigstoreSigned` policy
names as `keyPath`), the private half as a PEM `ENCRYPTED COSIGN PRIVATE KEY`: a JSON
document holding the PKCS#8 key sealed by NaCl's secretbox (XSalsa20-Poly1305) under a key
derived from the passphrase by scrypt (N=32768, r=8, p=1), every byte string base64. That
is the only private key form skopeo 1.9 reads (an unencrypted PEM is refused), so it is the
one sysbake writes and reads; an empty passphrase is allowed, as with cosign.

A signature is ECDSA-SHA256 (DER) over the payload, base64, as the
`dev.cosignproject.cosign/signature` annotation of the payload's layer in the
`sha256-<digest>.sig` manifest (sysbake.registry.attach). The payload is the "cosign
container image signature" JSON that containers/image checks: exactly `critical` (type,
image digest, docker reference) and `optional`.

`cryptography` (PyPI) does the elliptic curves and PyNaCl (PyPI, libsodium) the secretbox,
both imported only here, by the commands that sign; scrypt is the standard library's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from typing import TYPE_CHECKING, Any

from sysbake import __version__
from sysbake.supply import SupplyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

PRIVATE_PEM = "ENCRYPTED COSIGN PRIVATE KEY"
SIGNATURE_TYPE = "cosign container image signature"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
SCRYPT = {"N": 32768, "r": 8, "p": 1}
_SALT, _NONCE, _KEY = 32, 24, 32


# -- NaCl secretbox (XSalsa20-Poly1305), from PyNaCl -----------------------------------------


def secretbox_seal(message: bytes, nonce: bytes, key: bytes) -> bytes:
    """NaCl's crypto_secretbox: the Poly1305 tag, then the XSalsa20 ciphertext."""
    from nacl.secret import SecretBox

    return SecretBox(key).encrypt(message, nonce).ciphertext


def secretbox_open(box: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """The message `secretbox_seal` sealed, or None when the box or the key is wrong."""
    from nacl.exceptions import CryptoError
    from nacl.secret import SecretBox

    try:
        return SecretBox(key).decrypt(box, nonce)
    except CryptoError:
        return None


def _scrypt(passphrase: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(
        passphrase,
        salt=salt,
        n=SCRYPT["N"],
        r=SCRYPT["r"],
        p=SCRYPT["p"],
        maxmem=64 << 20,
        dklen=_KEY,
    )


def encrypt_key(plain: bytes, passphrase: bytes) -> bytes:
    """The encrypted-key JSON document of `plain` (cosign's and skopeo's format)."""
    salt, nonce = secrets.token_bytes(_SALT), secrets.token_bytes(_NONCE)
    sealed = secretbox_seal(plain, nonce, _scrypt(passphrase, salt))
    b64 = base64.b64encode
    doc = {
        "kdf": {"name": "scrypt", "params": SCRYPT, "salt": b64(salt).decode()},
        "cipher": {"name": "nacl/secretbox", "nonce": b64(nonce).decode()},
        "ciphertext": b64(sealed).decode(),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decrypt_key(document: bytes, passphrase: bytes, where: str) -> bytes:
    """The plain key an encrypted-key document holds; SupplyError naming `where` when it is
    malformed, uses other algorithms or parameters, or the passphrase is wrong."""
    try:
        doc = json.loads(document)
        kdf, cipher = doc["kdf"], doc["cipher"]
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(cipher["nonce"], validate=True)
        sealed = base64.b64decode(doc["ciphertext"], validate=True)
        names = (kdf["name"], cipher["name"])
        params = {k: kdf["params"][k] for k in SCRYPT}
    except (ValueError, KeyError, TypeError) as exc:
        raise SupplyError(f"{where}: not an encrypted sigstore private key ({exc})") from exc
    if names != ("scrypt", "nacl/secretbox") or params != SCRYPT or len(nonce) != _NONCE:
        raise SupplyError(
            f"{where}: expected scrypt (N=32768, r=8, p=1) and nacl/secretbox, got {names[0]} "
            f"{params} and {names[1]}"
        )
    plain = secretbox_open(sealed, nonce, _scrypt(passphrase, salt))
    if plain is None:
        raise SupplyError(f"{where}: wrong passphrase (the key does not decrypt)")
    return plain


# -- PEM ----------------------------------------------------------------------------------


def pem(kind: str, data: bytes) -> str:
    """`data` as a PEM block of `kind`."""
    body = base64.b64encode(data).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n"


def unpem(text: bytes, kind: str, where: str) -> bytes:
    """The bytes of the first PEM block of `text`, which must be of `kind`."""
    lines = text.decode("ascii", errors="replace").strip().splitlines()
    begin, end = f"-----BEGIN {kind}-----", f"-----END {kind}-----"
    if not lines or lines[0].strip() != begin or end not in (line.strip() for line in lines):
        found = lines[0].strip() if lines else "an empty file"
        raise SupplyError(f"{where}: expected a PEM '{kind}' block, found {found[:60]!r}")
    body = "".join(lines[1 : [line.strip() for line in lines].index(end)])
    try:
        return base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise SupplyError(f"{where}: the PEM block is not base64") from exc


# -- keys ---------------------------------------------------------------------------------


def generate_key_pair(passphrase: bytes) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key pair: (encrypted private key PEM, public key PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem(PRIVATE_PEM, encrypt_key(pkcs8, passphrase)).encode(), public_pem(key)


def public_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(text: bytes, passphrase: bytes, where: str) -> EllipticCurvePrivateKey:
    """The ECDSA private key of an encrypted key file (cosign's format); SupplyError naming
    `where` for anything else (another PEM, a wrong passphrase, another curve)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    plain = decrypt_key(unpem(text, PRIVATE_PEM, where), passphrase, where)
    try:
        key = serialization.load_der_private_key(plain, password=None)
    except ValueError as exc:
        raise SupplyError(f"{where}: the decrypted key is not PKCS#8 ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SupplyError(f"{where}: expected an ECDSA P-256 key")
    return key


def sign(key: EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """ECDSA-SHA256 over `payload`, DER-encoded."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def verify(public: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether `signature` (DER) is the PEM public key's ECDSA-SHA256 over `payload`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_public_key(public)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# -- payloads -----------------------------------------------------------------------------


def simple_signing_payload(manifest_digest: str, docker_reference: str) -> bytes:
    """The payload a sigstore signature of an image signs: its manifest digest and the
    reference it is published as (what podman's signedIdentity rules check). No
    timestamp: the same image and reference give the same payload."""
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": {"creator": f"sysbake {__version__}"},
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what an envelope's signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def dsse_envelope(
    key: EllipticCurvePrivateKey, payload_type: str, payload: bytes
) -> dict[str, Any]:
    """A DSSE envelope of `payload` signed by `key` (keyid: the public key's SHA-256)."""
    keyid = hashlib.sha256(public_pem(key)).hexdigest()
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": keyid,
                "sig": base64.b64encode(sign(key, pae(payload_type, payload))).decode(),
            }
        ],
    }


def write_key_pair(prefix: str, passphrase: bytes) -> tuple[str, str]:
    """Write PREFIX.key (0600) and PREFIX.pub; neither may exist. The two paths."""
    private, public = generate_key_pair(passphrase)
    paths = (f"{prefix}.key", f"{prefix}.pub")
    for path in paths:
        if os.path.lexists(path):
            raise SupplyError(
                f"{path} exists: not overwritten (remove it, or choose another prefix)"
            )
    for path, data, mode in ((paths[0], private, 0o600), (paths[1], public, 0o644)):
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return paths
