"""SecAgg+ masks from a cryptographic PRG keyed by the whole seed (client and server).

Why this exists. Flower 1.42 expands every SecAgg+ mask with
``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``, which XORs the
seed's 4-byte words into ONE 32-bit integer and seeds NumPy's MT19937 with it: a mask
has at most 2^32 possible values whatever the seed, and two seeds whose words XOR to
the same value give identical masks (``tests/test_secagg_prg.py`` shows one such pair).
When a client's upload arrives late or is rejected, the server
reconstructs its pairwise-mask key (that is the protocol's dropout recovery), so only
its private mask hides that upload; with 2^32 candidate masks, a brute force that keeps
the candidate leaving every value within the quantization range [0, T] finds it on one
machine. (Reported upstream: docs/secure-aggregation.md, "Upstream report".)

What replaces it. ``mask_arrays(seed, num_range, shapes)`` has Flower's signature and
returns the same layout (one int64 array per shape, values in [0, num_range)):

- key = HKDF-SHA256(seed, salt = none, info = ``INFO``), 32 bytes: every byte of the
  seed counts (the 32 random bytes of a private-mask seed b_i, or the 44-byte base64
  form of the 32-byte ECDH-derived pairwise key), and the label separates these masks
  from any other use of the same secret;
- keystream = AES-256 in CTR mode under that key, nonce / initial counter 0, i.e. the
  encryption of zero bytes (``cryptography``'s documented interface; each key expands
  exactly one mask per protocol round, so the fixed nonce never repeats under a key);
- the keystream is read as little-endian uint32 (``num_range`` a power of two up to
  2^32: masked to the range, exactly uniform) or uint64 reduced mod ``num_range``
  (other ranges up to 2^32: bias below 2^-32), in the order of ``shapes``, C order.

No cryptography is written here: HKDF and AES-CTR are the ``cryptography`` package's.
The client side installs this function where Flower's ``secaggplus_mod`` looks it up
(``fl_app/secagg_client.py``, ``cryptographic_masks``); the server's unmasking
(``strategies/secagg.py``) calls it directly. Both must use the same function, or
nothing unmasks (the round is then rejected by the server's range check).

This module imports nothing from ``fl_app`` (server and client both use it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"fl-app secagg+ mask expansion v1: HKDF-SHA256 -> AES-256-CTR"
MAX_RANGE = 2**32  # the masked sum is int64 arithmetic on values below this
_NONCE = bytes(16)  # CTR's initial counter block: one mask per key


def mask_key(seed: bytes) -> bytes:
    """The AES-256 key of the mask that ``seed`` expands to (HKDF-SHA256, ``INFO``)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError(f"a SecAgg+ mask seed must be at least 16 bytes; got "
                         f"{type(seed).__name__} of length {len(seed) if hasattr(seed, '__len__') else '?'}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(bytes(seed))


def keystream(seed: bytes, num_bytes: int) -> bytes:
    """``num_bytes`` of AES-256-CTR keystream under ``mask_key(seed)``, counter from 0."""
    encryptor = Cipher(algorithms.AES(mask_key(seed)), modes.CTR(_NONCE)).encryptor()
    return encryptor.update(bytes(num_bytes)) + encryptor.finalize()


def mask_arrays(seed: bytes, num_range: int,
                dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform in [0, ``num_range``) for each shape: a drop-in for Flower's
    ``pseudo_rand_gen(seed, num_range, dimensions_list)`` (module docstring).

    The keystream is produced ``_CHUNK`` bytes at a time into a per-thread buffer and
    widened into the one int64 output (the same stream as ``keystream``: CTR mode does
    not depend on how it is cut); a fresh multi-megabyte buffer per call would cost more
    in page faults than the cipher itself."""
    if not isinstance(num_range, int) or isinstance(num_range, bool) or not 2 <= num_range <= MAX_RANGE:
        raise ValueError(f"SecAgg+ mask range must be an integer in [2, 2^32]; got {num_range!r}")
    sizes = [math.prod(shape) for shape in dimensions_list]
    total = sum(sizes)
    power_of_two = num_range & (num_range - 1) == 0
    width, dtype = (4, "<u4") if power_of_two else (8, "<u8")
    encryptor = Cipher(algorithms.AES(mask_key(seed)), modes.CTR(_NONCE)).encryptor()
    buffer = _buffer()
    values = np.empty(total, dtype=np.int64)
    step = _CHUNK // width
    for start in range(0, total, step):
        count = min(step, total - start)
        encryptor.update_into(_ZEROS[:count * width], buffer)
        chunk = np.frombuffer(buffer, dtype=dtype, count=count)
        if power_of_two:
            values[start:start + count] = chunk
        else:
            values[start:start + count] = chunk % np.uint64(num_range)
    encryptor.finalize()
    if power_of_two and num_range != MAX_RANGE:
        values &= num_range - 1
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes):
        out.append(values[start:start + size].reshape(shape))
        start += size
    return out


_CHUNK = 1 << 18  # keystream bytes per call into the cipher
_ZEROS = memoryview(bytes(_CHUNK))
_LOCAL = threading.local()


def _buffer() -> bytearray:
    """This thread's output buffer for ``update_into`` (it needs 15 spare bytes)."""
    buffer = getattr(_LOCAL, "buffer", None)
    if buffer is None:
        buffer = _LOCAL.buffer = bytearray(_CHUNK + 15)
    return buffer
