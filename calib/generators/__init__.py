"""ZSAQ generators, one module per kind registered in :data:`calib.registry.GENERATORS` (a ``build(calib,
teacher, special_ids, tokenizer)`` function each): ``sample(batch, rng) -> Batch`` of differentiable
``inputs_embeds`` and masks of varied lengths, seeded by the ``rng`` passed in; ``set_progress(fraction)``."""
