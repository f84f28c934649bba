"""Evaluation: metric functions (``metrics``), reports (``report``), stage validation and the
test report (``evaluation``), a detector's landmark error (``landmarks``), the ABAW
submission (``abaw``).

Imports: ``core``, ``faces``, ``data``, ``models``, ``run``, ``predict``.
"""
