"""aipod: serve ML models behind one streaming gRPC method.

The worker side (:mod:`aipod.worker`) uses the standard library only.
"""

__version__ = "0.1.0"
