"""Randomness: reproducible where an experiment needs it, secret where a guarantee needs it.

Two kinds of random numbers run through a federated round:

- **Experimental randomness** (the split, the initial model, which clients are sampled,
  the shuffling of plain SGD): derived from run-config ``seed`` with ``derive_seed``, so
  that a run is reproducible. The server and every client know ``seed``.
- **Randomness a privacy guarantee rests on** (DP-SGD's noise and Poisson batches,
  user-level DP's server noise): it must be unknown to everyone the guarantee protects
  against. With ``dp-randomness = "secure"`` (the default) every such generator is keyed
  per use from the operating system's CSPRNG (``secrets``/``os.urandom``), never from
  anything in the run config. ``"seeded"`` keeps the old reproducible behaviour for
  experiments: it gives no guarantee against anyone who knows the seed (the server
  does), and the app accepts it only in simulation.

What "keyed from the CSPRNG" means for each generator, and what risk remains:

- PyTorch's CPU generator is an MT19937 whose ``manual_seed`` keeps only 32 bits of a
  seed (``state[0] = seed & 0xffffffff``), so a seed from ``secrets`` would still leave a
  2^32 search, cheap for a server that can test each candidate against a reply (the
  right seed makes the residual norm collapse). ``secret_torch_generator`` therefore
  writes all 624 words of MT19937's state (19,968 bits) from ``os.urandom`` through
  ``Generator.set_state`` (the layout is checked; an unexpected one raises instead of
  falling back). On CUDA the generator is Philox keyed by a 64-bit seed from
  ``secrets``: a 2^64 search.
- NumPy's generator for the server noise is PCG64 keyed by a 128-bit ``SeedSequence``
  entropy from ``secrets``.
- Neither MT19937 nor PCG64 is a cryptographically secure generator: their raw outputs
  would reveal their state. Here no raw output is ever released: each draw is added to a
  clipped gradient sum (and, with Opacus's ``secure_mode``, is the mean of four draws
  after a discarded one) before anything leaves the process. Opacus's own answer,
  ``PrivacyEngine(secure_mode=True)``, needs ``torchcsprng``, which has no build for the
  torch this app pins (its last release, 0.2.1, is from 2021); a CSPRNG-backed torch
  generator would close this residual gap.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import torch

RANDOMNESS_MODES = ("secure", "seeded")

# torch's CPU generator state (CPUGeneratorImplState): seed (u64), left (i32),
# seeded (i32), next (u64), then MT19937's 624 words, each stored in a u64; then the
# cached normal samples. Checked against the running torch before use.
_MT_STATE_BYTES = 5056
_MT_WORDS_OFFSET = 24
_MT_WORDS = 624


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (run seed, round, partition, ...): for
    experimental randomness only, never for noise a guarantee rests on."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def secret_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` whose whole state comes from the OS CSPRNG."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.Generator(device=device).manual_seed(secrets.randbits(64))
    generator = torch.Generator()
    state = generator.get_state().numpy().copy()
    if state.size != _MT_STATE_BYTES:
        raise RuntimeError(
            f"torch's CPU generator state has {state.size} bytes, not the {_MT_STATE_BYTES} "
            "of the MT19937 layout this app keys from the OS CSPRNG; refusing to draw "
            "DP noise from a generator it cannot key (use a torch release this app pins)")
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32).astype(np.uint64)
    state[_MT_WORDS_OFFSET:_MT_WORDS_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return generator


def mt_state_words(generator: torch.Generator) -> np.ndarray:
    """The 624 MT19937 words of a CPU generator (for tests of the keying)."""
    state = generator.get_state().numpy()
    return state[_MT_WORDS_OFFSET:_MT_WORDS_OFFSET + 8 * _MT_WORDS].view(np.uint64).copy()


def secret_numpy_generator() -> np.random.Generator:
    """A NumPy generator (PCG64) keyed by 128 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(128))))
