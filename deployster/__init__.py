"""Deployster: zero-downtime deploys of Docker images onto a CoreOS fleet cluster."""

__version__ = "0.5.0"
