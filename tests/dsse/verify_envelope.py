#!/usr/bin/env python3
"""Independent DSSE check for keybroker's attestation tests.

Usage: verify_envelope.py ENVELOPE.json PUBLIC_KEY.pem

Verifies the envelope's signature over the DSSE PAE with securesystemslib
(PyPI `securesystemslib[crypto]`), an implementation that shares no code with
keybroker. The public key is loaded with `cryptography` and given the key id
each signature names (cosign and keybroker write an empty key id), since
securesystemslib only tries keys whose id matches. Prints the payload (the
in-toto statement) on stdout and exits 0 when a signature verifies; exits 1
with the reason on stderr otherwise.
"""

import json
import sys

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], "rb") as f:
        data = json.load(f)
    with open(sys.argv[2], "rb") as f:
        public_key = load_pem_public_key(f.read())
    envelope = Envelope.from_dict(data)
    if envelope.payload_type != "application/vnd.in-toto+json":
        print(f"unexpected payloadType {envelope.payload_type!r}", file=sys.stderr)
        return 1
    base = SSlibKey.from_crypto(public_key, scheme="ecdsa-sha2-nistp256")
    # from_crypto computes a key id when given an empty one; build the key
    # with exactly the id each signature names.
    keys = [
        SSlibKey(keyid, base.keytype, base.scheme, base.keyval)
        for keyid in envelope.signatures
    ]
    try:
        envelope.verify(keys, 1)
    except Exception as e:  # securesystemslib raises VerificationError / ValueError
        print(f"DSSE verification failed: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(envelope.payload.decode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
