"""The ``sglang`` engine: SGLang 0.5.23's ``MMEncoder`` for encode, ``sglang.Engine`` for
prefill and decode (SGLang's own disaggregation and bootstrap server) and for aggregated
workers. Imported only when ``--engine sglang`` (or ``--encode-engine sglang``) asks for it.
"""
