"""GPU kernels for PAR's hot steps, installed as `par_vllm.kernels`.

Each kernel computes the same function as a step of the torch reference in
`par_vllm.reduction` and is tested against it.
"""
