"""Models: Qwen-VL families and loading (``loading``), prompt styles (``prompts``) and the
encoding of prompt, image and answer into token ids with the exact loss mask (``encode``).

Imports: ``cervl.core``.
"""
