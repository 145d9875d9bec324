"""Stands in for AWS KMS in keybroker's tests: moto's server (PyPI `moto[server]`)
on 127.0.0.1, with one defect of moto corrected.

moto 5 reads `MessageType` in Sign but ignores it: with `MessageType=DIGEST` it
hashes the 32-byte digest again, so a correct client's signature never verifies
(AWS KMS signs the digest as given). This launcher makes ECDSA signing use the
digest as prehashed when the request says DIGEST, and refuses a digest of the
wrong length as KMS does. moto's own Verify is left alone and never trusted by
our tests: they verify with the public key from GetPublicKey.

Usage: python3 tests/aws/moto_kms_server.py PORT
"""

import contextvars
import sys

from cryptography.hazmat.primitives.asymmetric import ec, utils as asym_utils
from moto.kms import responses as kms_responses
from moto.kms import utils as kms_utils
from moto.kms.exceptions import ValidationException

_digest_request = contextvars.ContextVar("digest_request", default=False)

_original_response_sign = kms_responses.KmsResponse.sign


def _response_sign(self):
    token = _digest_request.set(self._get_param("MessageType") == "DIGEST")
    try:
        return _original_response_sign(self)
    finally:
        _digest_request.reset(token)


_original_ecdsa_sign = kms_utils.ECDSAPrivateKey.sign


def _ecdsa_sign(self, message, signing_algorithm):
    if not _digest_request.get():
        return _original_ecdsa_sign(self, message, signing_algorithm)
    kms_utils.validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
    hash_algorithm = self._ECDSAPrivateKey__hash_algorithm(signing_algorithm)
    if len(message) != hash_algorithm.digest_size:
        raise ValidationException(
            f"Digest is invalid length for algorithm {signing_algorithm}."
        )
    return self.private_key.sign(message, ec.ECDSA(asym_utils.Prehashed(hash_algorithm)))


kms_responses.KmsResponse.sign = _response_sign
kms_utils.ECDSAPrivateKey.sign = _ecdsa_sign

if __name__ == "__main__":
    from moto.server import main

    main(["-H", "127.0.0.1", "-p", sys.argv[1]])
