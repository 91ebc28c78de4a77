"""One route module per resource: decisions, the policy, operations (health, readiness, metrics)."""
