"""The coefficient form of a weight: ``W = reshape((mask * coeff) @ basis, W.shape)``.

Owns the algebra and the modules that hold it: :mod:`.compose` (the one definition of the composition),
:mod:`.bases` (filter bases: DCT, spatial, random, user-given), :mod:`.reparam` (``BasisWeight``, the
module holding ``coeff``/``mask``/``basis`` of one weight) and :mod:`.parametrize` (the same form for a
weight no graph reads, composed on every read of ``module.weight``).

May import: torch, :mod:`ipfx.errors`. Nothing in here knows about graphs or capture.
"""
