"""Deployment: nginx in front of N daphne workers (see deploy/README.md)."""
