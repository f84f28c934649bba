"""Training: the recipe entry point (``recipe.train``), the typed recipe (``config``), a stage's
data, views and files (``stage_data``, ``augment``, ``stage_outputs``), the training levers
(``objective``), the stage's set-up (``stage_setup``) and its loop (``trainer``), sharding, checkpoints, and the tiny base's
pretraining (``pretrain_tiny``).

Imports: everything below it (``core`` .. ``evaluate``);
nothing above (``experiments``, ``explain``, ``serve``, ``scale``, ``cli``).
"""
