"""Runtimes: where one platform's image is built and pushed (Docker today)."""
