"""Device-specific workarounds for third-party packages, one module per package and platform.

``megatron_cpu``: run megatron-core on CPU with gloo (``enable_cpu_megatron``).
``sglang_cpu``: run SGLang's rollout engine on CPU.
``quiet``: the third-party warnings and log lines that only restate these fallbacks, filtered in the
workers by message.

Nothing is imported here, so importing one of these modules never pulls in another's package.
"""
