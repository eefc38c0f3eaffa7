"""The ``triptych`` command: ``triptych serve`` starts a whole stack, ``triptych frontend``,
``encode``, ``prefill`` and ``decode`` run one component."""
