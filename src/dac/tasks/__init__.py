"""The commands that run on the batch engine of :mod:`dac.jobs`: ``dac crop`` (:mod:`~dac.tasks.crop`)
and ``dac predict`` (:mod:`~dac.tasks.predict`).

Import from the task's module (``from dac.tasks.crop import crop_archive``); this package
imports nothing itself, so that ``dac predict`` does not load the cropping layer's
dependencies and the other way round.
"""
