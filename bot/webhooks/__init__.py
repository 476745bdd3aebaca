"""Webhook ingress: verify, parse, decide (pure), record (one transaction), answer."""
