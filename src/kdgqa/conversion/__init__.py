"""MHA -> grouped-query conversion: ``converter`` swaps the attention layers, ``pooling``
starts each KV head from its group, ``options`` lists the choices (torch-free)."""
