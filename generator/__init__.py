"""The synthetic dataset generator: pose -> appearance -> scene -> render -> write.

Only `generator.render` (and the worker process that drives it) imports `bpy`.
"""
