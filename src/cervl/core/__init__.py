"""The small core everything uses: errors, the registry lookup, label sets and AU definitions, file
I/O (atomic writes, JSON, folder swaps), the one image loader, worker processes, the fault point,
plot colours.

Imports: nothing of cervl outside ``cervl.core``.
"""
