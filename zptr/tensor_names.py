"""The ZPTR head's tensor names, in one place (as :mod:`zptr.formats.keys` holds the metadata keys).

A checkpoint's ``soul.safetensors`` and the Omega sidecar both use them; the router tensors are
the router module's own parameter names under :attr:`Tensors.OMEGA_PREFIX`. They live in the
core layer because checkpoints (core) read and write them.
"""

from __future__ import annotations


class Tensors:
    SOUL_ALPHA = "soul.alpha"  # scalar alpha; the soul's gate is sigmoid(alpha)
    SOUL_ROTATION = "soul.rotation"  # R materialised: (D/8, 8, 8) blocks (so8) or (D, D) (dense)
    SOUL_GENERATOR = "soul.generator"  # so8 only: the free generator A, R = exp(A - A^T)
    OMEGA_PREFIX = "omega."
    OMEGA_GATE = "omega.gate"  # scalar omega, the residual gate's logit

    @staticmethod
    def omega(name: str) -> str:
        """The stored name of the router parameter ``name`` (``phase.weight`` -> ``omega.phase.weight``)."""
        return Tensors.OMEGA_PREFIX + name

    @staticmethod
    def is_omega(name: str) -> bool:
        return name.startswith(Tensors.OMEGA_PREFIX)

    @staticmethod
    def router_name(name: str) -> str:
        """The router's own parameter name of a stored ``omega.*`` tensor (the inverse of :meth:`omega`)."""
        return name.removeprefix(Tensors.OMEGA_PREFIX)


__all__ = ["Tensors"]
