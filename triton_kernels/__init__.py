"""Triton kernels and their launchers, installed as `sparsekern.triton_kernels`.

Launchers take and return plain tensors and know nothing of sparsekern's ops or modules;
`sparsekern.ops._triton_ops` wraps them as custom ops. Under TRITON_INTERPRET=1 they run on CPU tensors.
"""
