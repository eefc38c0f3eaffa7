"""The ``triptych`` command: ``triptych serve`` starts a whole stack, ``triptych frontend``,
``encode``, ``prefill`` and ``decode`` run one component."""

if __name__ != "triptych.cli":  # the folder is reached only through the package
    raise ImportError(f"import triptych.cli, not {__name__} (docs/architecture.md)")
