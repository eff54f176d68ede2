"""Device-specific workarounds for third-party packages, one module per package and platform.

``megatron_cpu``: run megatron-core on CPU with gloo (``enable_cpu_megatron``).
``sglang_cpu``: run SGLang's rollout engine on CPU.

Nothing is imported here, so importing one of these modules never pulls in another's package.
"""
