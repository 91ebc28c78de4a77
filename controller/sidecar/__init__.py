"""The FastAPI sidecar: one decision service next to each vLLM server (ARCHITECTURE.md contract 6).

- :mod:`.app` assembles the app; :mod:`.settings` is its one typed settings object;
- :mod:`.routes` has one module per resource (decide, policy, ops);
- :mod:`.service` holds the state: the policy store and per-engine feature states
  (:mod:`.store`), the metrics (:mod:`.metrics`) and the trace recorder (:mod:`.recorder`);
- :mod:`.cli` is the ``spec-sidecar`` console script; :mod:`.harness` runs a real server
  (and a real Prometheus) for tests, the benchmark and the dashboard plot.

The engine side is :mod:`controller.client` (stdlib only).
"""
