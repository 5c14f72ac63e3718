"""The Alertmanager webhook server: alerts in, queued runbook runs out.

::

    webhook body → authenticate → parse (alerts) → route (routing, fleet) → record (intake)
      → durable queue (state) → worker pool (worker) → pipeline.run_runbook

``serve`` wires it all behind uvicorn; ``app`` is the ASGI edge; nothing here reads global
settings: :func:`engine.server.serve.serve` builds them once and passes them down.
"""
