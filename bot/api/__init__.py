"""What operators and developers read: the REST API (and, later, SSE, dashboard, metrics)."""
