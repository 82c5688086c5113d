"""Cluster jobs: cluster profiles, and Slurm / Kubernetes jobs rendered from the templates in ``jobs/``."""
