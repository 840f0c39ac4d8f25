"""The supply chain of an image: what is in it (an SBOM), how it was made (provenance), and
who made it (sigstore signatures).

- `packages`: dpkg status, DEP-5 copyright files, Python METADATA and purls, parsed
  (pure functions of bytes);
- `licences`: Debian's and Python's licence names as SPDX expressions;
- `inventory`: the packages of a stored image and the layer (stage) that brought each,
  read through sysbake.rootfs.Root only;
- `sbom`: an inventory as SPDX 2.3 or CycloneDX 1.5 JSON, deterministic;
- `provenance`: an in-toto statement with a SLSA v1 predicate, from the image's stage
  records (hashes of inputs, never their contents);
- `signing`: sigstore key pairs, simple-signing payloads, DSSE envelopes.

The registry side (signature and referrer attachments) is sysbake.registry.attach.
"""

from __future__ import annotations

from sysbake.errors import SysbakeError


class SupplyError(SysbakeError):
    """An SBOM, a provenance statement or a signature cannot be made: the message names the
    image path, file or key and what was expected."""
