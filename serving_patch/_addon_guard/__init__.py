"""Holds the ``sitecustomize`` that child interpreters load (see :mod:`serving_patch.compat`)."""
