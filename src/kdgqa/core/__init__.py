"""The arithmetic under every scheme, knowing no scheme by name: apportionment of query heads
(``apportion``), the one fused attention call for any head map (``ops``), the Triton kernels
(``kernels``) and PGQA's output perturbation (``perturb``)."""
